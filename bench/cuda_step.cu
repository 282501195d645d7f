// CUDA step time of mpopt::cuda::optimizer<adamw, ...>, timed with CUDA events (manual time), reported as bytes/s
// by the bytes-per-parameter rule below so that every figure reads as a fraction of memory bandwidth; a
// device-to-device copy of the same bytes, in the same binary, is the ceiling.
//
//   adamw/<policy>/<layout>/<params>   layout: flat (one buffer), flat_graph (the step replayed from a CUDA graph),
//                                      tensors500 (500 separate allocations: the multi-tensor table)
//   copy/<policy>/<params>             cudaMemcpyAsync of step_bytes_per_param<policy> * params / 2 bytes
//                                      (it reads and writes that many: the same traffic as the step)
//
// Sizes that do not fit are skipped with the allocation error. bench/RESULTS.md has the commands and the figures.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_bench.cuh"
#include "mpopt/cuda/optimizer.cuh"
#include "mpopt/mpopt.hpp"
#include "mpopt/policy/traffic.hpp"

namespace {

using mpopt_bench::check;
using mpopt_bench::copy_ceiling;
using mpopt_bench::init_buffers;
using mpopt_bench::on_new_stream;
using mpopt_bench::report_bytes;
using mpopt_bench::time_loop;

// Bytes one AdamW step moves per parameter: the fused update (read grad, master, exp_avg, exp_avg_sq; write master,
// exp_avg, exp_avg_sq and, when the master is separate, the param copy: mpopt::update_bytes_per_param) plus the
// read-only statistics pass over the grads, which every configuration here makes (the overflow check is on).
//   fp32 4+8+16 + 4 = 32;  bf16/fp16 params, fp32 master 2+8+16+2 + 2 = 30;  bf16 pure, bf16 states 2+4+8 + 2 = 16.
// (torch's fused AdamW moves 28 B/param for fp32, plus 8 for GradScaler's check pass: bench/compare_torch.py.)
template <class Prec>
constexpr std::size_t step_bytes_per_param() {
  return mpopt::update_bytes_per_param<Prec>(2) + sizeof(typename Prec::grad_t);
}
static_assert(step_bytes_per_param<mpopt::fp32_policy>() == 32);
static_assert(step_bytes_per_param<mpopt::bf16_mixed_policy>() == 30);

using bf16_pure = mpopt::bf16_pure_policy;  // bf16 params = master, bf16 states

enum class layout { flat, flat_graph, tensors500 };

const char* layout_name(layout l) {
  switch (l) {
    case layout::flat: return "flat";
    case layout::flat_graph: return "flat_graph";
    case layout::tensors500: return "tensors500";
  }
  return "?";
}

template <class Prec, class Scaler>
void run_adamw(benchmark::State& state, cudaStream_t stream, std::size_t n, layout lay) {
  using P = typename Prec::param_t;
  using G = typename Prec::grad_t;
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, Prec, Scaler>;
  const std::size_t tensors = lay == layout::tensors500 ? 500 : 1;
  std::vector<mpopt::cuda::device_buffer<P>> params;
  std::vector<mpopt::cuda::device_buffer<G>> grads;
  std::vector<mpopt::param_group<mpopt::adamw, Prec>> groups;
  for (std::size_t t = 0; t < tensors; ++t) {
    const std::size_t size = n / tensors + (t == 0 ? n % tensors : 0);
    params.emplace_back(size, "params");
    grads.emplace_back(size, "grads");
    init_buffers<<<1024, 256, 0, stream>>>(params.back().get(), grads.back().get(), size);
    mpopt::param_group<mpopt::adamw, Prec> g;
    g.params = params.back().get();
    g.grads = grads.back().get();
    g.size = size;
    g.hparams.lr = 1e-4;
    g.hparams.weight_decay = 0.1;
    groups.push_back(g);
  }
  if (!check(state, cudaStreamSynchronize(stream), "initialising the buffers")) return;
  opt_t opt(groups, {}, {}, stream);

  if (lay == layout::flat_graph) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    if (!check(state, cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture")) return;
    opt.step(stream);
    if (!check(state, cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture")) return;
    const bool instantiated = check(state, cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    cudaGraphDestroy(graph);
    if (!instantiated) return;
    time_loop(state, stream, [&] { cudaGraphLaunch(exec, stream); });
    cudaGraphExecDestroy(exec);
  } else {
    time_loop(state, stream, [&] { opt.step(stream); });
  }
  if (!opt.last_error().ok()) {
    state.SkipWithError(opt.last_error().message.c_str());
    return;
  }
  const mpopt::step_result r = opt.result(stream);
  if (!r.error.ok()) {
    state.SkipWithError(r.error.message.c_str());
  } else if (!r.applied) {
    state.SkipWithError("the last step was skipped: the timing is not of an applied step");
  }
}

template <class Prec, class Scaler>
void bm_adamw(benchmark::State& state, std::size_t n, layout lay) {
  on_new_stream(state, [&](cudaStream_t stream) { run_adamw<Prec, Scaler>(state, stream, n, lay); });
  report_bytes(state, n, double(n * step_bytes_per_param<Prec>()));
}

template <class Prec, class Scaler>
void register_policy(const std::string& policy, const std::vector<std::size_t>& sizes) {
  for (std::size_t n : sizes) {
    for (layout l : {layout::flat, layout::flat_graph, layout::tensors500}) {
      auto* b =
          benchmark::RegisterBenchmark(("adamw/" + policy + "/" + layout_name(l) + "/" + std::to_string(n)).c_str(),
                                       [n, l](benchmark::State& s) { bm_adamw<Prec, Scaler>(s, n, l); });
      b->UseManualTime()->Unit(benchmark::kMicrosecond);
      if (n >= (std::size_t(1) << 28)) b->Iterations(20);
    }
    auto* c =
        benchmark::RegisterBenchmark(("copy/" + policy + "/" + std::to_string(n)).c_str(),
                                     [n](benchmark::State& s) { copy_ceiling(s, n, step_bytes_per_param<Prec>()); });
    c->UseManualTime()->Unit(benchmark::kMicrosecond);
    if (n >= (std::size_t(1) << 28)) c->Iterations(20);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::size_t> sizes = {std::size_t(1) << 20, std::size_t(1) << 24, std::size_t(1) << 28,
                                          std::size_t(1) << 30};
  register_policy<mpopt::fp32_policy, mpopt::no_scaler>("fp32", sizes);
  register_policy<mpopt::bf16_mixed_policy, mpopt::no_scaler>("bf16_mixed", sizes);
  register_policy<mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>("fp16_mixed_dynamic", sizes);
  register_policy<bf16_pure, mpopt::no_scaler>("bf16_pure", sizes);
  return mpopt_bench::run_registered(argc, argv);
}
