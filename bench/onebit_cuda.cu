// The CUDA 1-bit optimizers (mpopt::cuda::onebit::optimizer) and the compressed allreduce's kernels
// (mpopt/cuda/compressed_allreduce.cuh) on one GPU, timed with CUDA events (manual time) and reported as bytes/s by
// the byte counts below, so that every figure reads as a fraction of memory bandwidth (copy/ rows: the ceiling).
//
//   onebit_adam/exact/<params>          a warm-up step (freeze_step never reached): the exact Adam update
//   onebit_adam/compressed/<params>     a compressed step (freeze_step 2); on one GPU the 1-bit allreduce is the
//                                       identity, so this is the momentum and apply kernels alone
//   zero_one_adam/local/<params>        a local step without synchronisation (var_freeze_step 2, intervals doubling
//                                       every step up to a clipper never reached)
//   onebit_lamb/exact/<params>          a warm-up step: the exact LAMB update (two passes) and the trust-ratio EMA
//   onebit_lamb/compressed/<params>     a compressed step (freeze_step 2): the fused momentum, the moments with their
//                                       per-tensor sums, the factors, the update (one tensor per 4096-element segment
//                                       run; the equaliser pass returns at once after the first compressed step)
//   copy/<B>B/<params>                  cudaMemcpyAsync reading and writing B/2 bytes per param
//   compress/<pass>/W8/<params>         one pass of the allreduce for 8 simulated ranks, no communicator: rank 0's
//                                       worker compression, rank 0's server compression of the 8 received blocks,
//                                       the decompression of the gathered message
//
// The steps are fp16_mixed (fp16 params and grads, fp32 master and states: the precision the family is verified
// with), with the dynamic loss scaler (its overflow check makes every step read the grads once in the statistics
// pass; and step() then waits for the previous step, see cuda/onebit.cuh, which back-to-back steps cannot hide). Timed
// steps not in the phase their name says are an error. Sizes that do not fit are skipped with the allocation error.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_bench.cuh"
#include "mpopt/cuda/compressed_allreduce.cuh"
#include "mpopt/cuda/onebit.cuh"
#include "mpopt/mpopt.hpp"
#include "mpopt/policy/traffic.hpp"

namespace {

using mpopt::onebit::communication;
using mpopt::onebit::compressed_layout;
using mpopt::onebit::word_t;
using mpopt_bench::check;
using mpopt_bench::copy_ceiling;
using mpopt_bench::init_buffers;
using mpopt_bench::on_new_stream;
using mpopt_bench::report_bytes;
using mpopt_bench::time_loop;
namespace cob = mpopt::cuda::onebit;

using prec = mpopt::fp16_mixed_policy;

enum class mode { exact, compressed, local };

const char* mode_name(mode m) {
  switch (m) {
    case mode::exact: return "exact";
    case mode::compressed: return "compressed";
    case mode::local: return "local";
  }
  return "?";
}

// Bytes one step moves per parameter (P param, M master, S state, G grad sizes; the work buffer is fp32). Every
// step starts with the read-only statistics pass over the grads (G).
//   exact:      the fused Adam update, update_bytes_per_param: read G + M + 2S, write M + 2S + P.
//               fp16_mixed: 2 + (2 + 8 + 16 + 2) = 30
//   compressed: local_momentum reads m (S) and the grad (G) and writes work (4); apply_momentum reads work (4),
//               master (M) and v (S) and writes m (S: the averaged momentum replaces it unread), master (M) and
//               param (P) (no mask on one GPU).
//               fp16_mixed: 2 + (4 + 2 + 4) + (4 + 4 + 4 + 4 + 4 + 2) = 34
//   local:      local_update reads master, m, v and the grad, writes m, master, param; no work buffer.
//               fp16_mixed: 2 + (4 + 8 + 2) + (4 + 4 + 2) = 26
// The step-scalars kernel and the applied-flag copy move a few hundred bytes per step whatever the size.
template <class Prec>
constexpr std::size_t step_bytes_per_param(mode m) {
  constexpr std::size_t P = sizeof(typename Prec::param_t), M = sizeof(typename Prec::master_t),
                        S = sizeof(typename Prec::state_t), G = sizeof(typename Prec::grad_t), work = sizeof(float);
  switch (m) {
    case mode::exact: return G + mpopt::update_bytes_per_param<Prec>(2);
    case mode::compressed: return G + (S + G + work) + (work + M + S + S + M + P);
    case mode::local: return G + (M + 2 * S + G) + (S + M + P);
  }
  return 0;
}
// 1-bit LAMB (cuda/onebit_lamb.cuh), after the statistics pass (G):
//   exact:      phase 1 reads G + M + 2S and writes 2S; phase 2 reads M + 2S and writes M + P.
//               fp16_mixed: 2 + (2 + 4 + 8 + 8) + (4 + 8 + 4 + 2) = 42
//   compressed: fused_momentum reads m (S) and the grad (G) and writes prev and fused (2 x 4); moments reads fused,
//               prev (2 x 4), v (S), the fresh variance (S) and the master (M) and writes m and the fresh variance
//               (2S); apply reads m, v (2S) and the master (M) and writes master (M) and param (P).
//               fp16_mixed: 2 + (4 + 2 + 8) + (8 + 4 + 4 + 4 + 8) + (8 + 4 + 4 + 2) = 62
template <class Prec>
constexpr std::size_t lamb_step_bytes_per_param(mode m) {
  constexpr std::size_t P = sizeof(typename Prec::param_t), M = sizeof(typename Prec::master_t),
                        S = sizeof(typename Prec::state_t), G = sizeof(typename Prec::grad_t), work = sizeof(float);
  switch (m) {
    case mode::exact: return G + (G + M + 4 * S) + (M + 2 * S + M + P);
    case mode::compressed: return G + (S + G + 2 * work) + (2 * work + 2 * S + M + 2 * S) + (2 * S + 2 * M + P);
    case mode::local: return 0;  // 1-bit LAMB takes no local steps
  }
  return 0;
}
static_assert(lamb_step_bytes_per_param<prec>(mode::exact) == 42);
static_assert(lamb_step_bytes_per_param<prec>(mode::compressed) == 62);

template <class Rule>
constexpr std::size_t rule_step_bytes_per_param(mode m) {
  return std::is_same_v<Rule, mpopt::onebit_lamb> ? lamb_step_bytes_per_param<prec>(m) : step_bytes_per_param<prec>(m);
}

static_assert(step_bytes_per_param<prec>(mode::exact) == 30);
static_assert(step_bytes_per_param<prec>(mode::compressed) == 34);
static_assert(step_bytes_per_param<prec>(mode::local) == 26);

// The compressed and local phases start after this many exact steps, so that the frozen variance is that of real
// grads (frozen at zero, every weight step would be lr·m/eps and drive the fp16 params to inf); the untimed warm-up
// runs them, so every timed step is of the phase named.
constexpr std::int64_t frozen_after = 2;
constexpr int warmup_steps = 4;

template <class Rule>
typename Rule::args args_for(mode m) {
  typename Rule::args a;
  a.lr = 1e-4;
  a.weight_decay = 0.1;
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
    // Local steps from step 3 with intervals 1, 2, 4, ...: steps 3 and 4 synchronise (in the untimed warm-up), no
    // later one does before step 2^40.
    a.var_freeze_step = frozen_after;
    a.local_step_scaler = 1;
    a.local_step_clipper = std::int64_t(1) << 40;
  } else {
    a.freeze_step = m == mode::exact ? std::int64_t(1) << 40 : frozen_after;
  }
  return a;
}

communication expected_communication(mode m) {
  switch (m) {
    case mode::exact: return communication::exact_allreduce;
    case mode::compressed: return communication::compressed_allreduce;  // the identity on one GPU
    case mode::local: return communication::none;
  }
  return communication::none;
}

template <class Rule>
void run_step(benchmark::State& state, cudaStream_t stream, std::size_t n, mode m) {
  using opt_t = cob::optimizer<Rule, prec, mpopt::dynamic_scaler>;
  mpopt::cuda::device_buffer<prec::param_t> params(n, "params");
  mpopt::cuda::device_buffer<prec::grad_t> grads(n, "grads");
  init_buffers<<<1024, 256, 0, stream>>>(params.get(), grads.get(), n);
  if (!check(state, cudaGetLastError(), "init_buffers launch")) return;
  if (!check(state, cudaStreamSynchronize(stream), "initialising the buffers")) return;
  mpopt::param_group<Rule, prec> g;
  g.params = params.get();
  g.grads = grads.get();
  g.size = n;
  g.hparams = args_for<Rule>(m);
  opt_t opt({g}, {}, {}, {}, stream);

  // Untimed warm-up past the exact steps and 0/1 Adam's synchronising ones.
  for (int i = 0; i < warmup_steps; ++i) opt.step(stream);
  if (!check(state, cudaStreamSynchronize(stream), "warm-up steps")) return;
  const communication expected = expected_communication(m);
  std::int64_t other = 0;
  // next_communication() waits for the previous step, which the timing loop has already waited for; step() then
  // finds nothing left to wait for.
  time_loop(
      state, stream,
      [&] {
        other += opt.next_communication() != expected ? 1 : 0;
        opt.step(stream);
      },
      /*warmup=*/0);
  if (!opt.last_error().ok()) {
    state.SkipWithError(opt.last_error().message.c_str());
    return;
  }
  const mpopt::step_result r = opt.result(stream);
  if (!r.error.ok()) {
    state.SkipWithError(r.error.message.c_str());
  } else if (!r.applied) {
    state.SkipWithError("the last step was skipped: the timing is not of an applied step");
  } else if (other != 0) {
    state.SkipWithError((std::to_string(other) + " timed steps were not " + mode_name(m) + " steps").c_str());
  }
}

template <class Rule>
void bm_step(benchmark::State& state, std::size_t n, mode m) {
  on_new_stream(state, [&](cudaStream_t stream) { run_step<Rule>(state, stream, n, m); });
  report_bytes(state, n, double(n * rule_step_bytes_per_param<Rule>(m)));
}

// ---------------------------------------------------------------------------------------------------------------------
// The compression kernels at a simulated world size.

enum class pass { worker, server, decompress };

const char* pass_name(pass p) {
  switch (p) {
    case pass::worker: return "worker";
    case pass::server: return "server";
    case pass::decompress: return "decompress";
  }
  return "?";
}

// Bytes one call moves (n elements, P = padded, C = chunk = P / W, words of 4 bytes):
//   worker:     signs pass reads buf (4n) and the worker error (4P), writes the sign words (P/8) and one partial
//               sum (8) per segment; the scale kernel reads the partials and writes W scale words; the error pass
//               reads buf (4n) and reads and writes the error (8P). About 20.1 B per element.
//   server:     signs pass reads the W received blocks (W·(C/8 + 4)), reads and writes the server error (8C: z kept
//               there), writes the block (C/8 + 4) and the partials; the error pass reads and writes it again (8C).
//               About 16.1 + W/8 B per chunk element: 2.14 B per element of the tensor at W = 8.
//   decompress: reads the gathered message (W blocks: P/8 + 4W) and writes the output (4n). About 4.1 B per element.
// The sign words are read once from memory: each is shared by the 32 lanes that unpack it.
std::size_t pass_bytes(const compressed_layout& l, pass p) {
  constexpr std::size_t word = sizeof(word_t), partial = sizeof(double);
  const std::size_t w = std::size_t(l.world), message = l.message_words() * word, block = l.block_words() * word;
  switch (p) {
    case pass::worker: return 8 * l.n + 12 * l.padded + message + 2 * partial * l.segments();
    case pass::server: {
      const std::size_t segments = (l.chunk_words() + mpopt::onebit::segment_words - 1) / mpopt::onebit::segment_words;
      return w * block + 16 * l.chunk + block + 2 * partial * segments;
    }
    case pass::decompress: return message + 4 * l.n;
  }
  return 0;
}

// x[i] in [-scale, scale), a hash of i and seed: every rank's buffer differs, and the signs are mixed.
__global__ void fill_signal(float* x, std::uint64_t n, std::uint32_t seed, float scale) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 0x9e3779b1u ^ std::uint32_t(i >> 32) ^ (seed * 0x85ebca6bu);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    x[i] = scale * (float(h >> 8) * 0x1p-23f - 1.0f);
  }
}

void run_compress(benchmark::State& state, cudaStream_t stream, std::size_t n, int world, pass p) {
  const compressed_layout l = compressed_layout::make(n, world);
  const std::size_t bw = l.block_words();
  mpopt::cuda::device_buffer<float> buf(n, "buffer"), worker_error(l.padded, "worker error"),
      server_error(l.chunk, "server error"), scales(2, "scales");
  mpopt::cuda::device_buffer<word_t> message(l.message_words(), "message"), received(l.message_words(), "received");
  mpopt::cuda::device_buffer<double> partials(l.segments(), "partial sums");
  mpopt::cuda::device_buffer<float> out(p == pass::decompress ? n : 0, "decompressed");

  // Rank q's message from its own buffer and a zero error; rank 0 receives block 0 of each. The last message is
  // also the gathered one: W blocks of chunk_words sign words and a scale word, the layout the all-gather makes.
  for (int q = 0; q < world; ++q) {
    fill_signal<<<1024, 256, 0, stream>>>(buf.get(), n, std::uint32_t(q), 1.0f + 0.25f * float(q));
    if (!check(state, cudaGetLastError(), "fill_signal launch")) return;
    if (!check(state, cudaMemsetAsync(worker_error.get(), 0, worker_error.bytes(), stream), "cudaMemsetAsync")) return;
    if (!check(
            state,
            cob::compress_worker(buf.get(), l, worker_error.get(), message.get(), partials.get(), scales.get(), stream),
            "compress_worker (setup)"))
      return;
    if (!check(state,
               cudaMemcpyAsync(received.get() + std::size_t(q) * bw, message.get(), bw * sizeof(word_t),
                               cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpyAsync (received block)"))
      return;
  }
  // Rank 0's buffer and a fresh error for the worker pass; a fresh server error.
  fill_signal<<<1024, 256, 0, stream>>>(buf.get(), n, 0u, 1.0f);
  if (!check(state, cudaGetLastError(), "fill_signal launch")) return;
  if (!check(state, cudaMemsetAsync(worker_error.get(), 0, worker_error.bytes(), stream), "cudaMemsetAsync")) return;
  if (!check(state, cudaMemsetAsync(server_error.get(), 0, server_error.bytes(), stream), "cudaMemsetAsync")) return;
  if (!check(state, cudaStreamSynchronize(stream), "setup")) return;

  // The timed worker and server passes write into `own`, so `received` and the gathered `message` stay as made.
  mpopt::cuda::device_buffer<word_t> own(p == pass::decompress ? 0 : l.message_words(), "own message");
  cudaError_t err = cudaSuccess;
  auto keep = [&err](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  switch (p) {
    case pass::worker:
      time_loop(state, stream, [&] {
        keep(cob::compress_worker(buf.get(), l, worker_error.get(), own.get(), partials.get(), scales.get(), stream));
      });
      break;
    case pass::server:
      time_loop(state, stream, [&] {
        keep(cob::compress_server(received.get(), l, server_error.get(), own.get(), partials.get(), scales.get() + 1,
                                  stream));
      });
      break;
    case pass::decompress:
      time_loop(state, stream, [&] { keep(cob::decompress(message.get(), l, out.get(), stream)); });
      break;
  }
  if (!check(state, err, (std::string(pass_name(p)) + " kernels").c_str())) return;
  check(state, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

void bm_compress(benchmark::State& state, std::size_t n, int world, pass p) {
  on_new_stream(state, [&](cudaStream_t stream) { run_compress(state, stream, n, world, p); });
  report_bytes(state, n, double(pass_bytes(compressed_layout::make(n, world), p)));
  state.counters["world"] = double(world);
}

std::string size_label(std::size_t n) {
  return std::to_string(n >> 20) + "M";
}

// B: what RegisterBenchmark returns (its namespace moved between Google Benchmark versions).
template <class B>
B* timed(B* b, std::size_t n) {
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
  if (n >= (std::size_t(1) << 28)) b->Iterations(20);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::size_t> step_sizes = {std::size_t(1) << 20, std::size_t(1) << 24, std::size_t(1) << 28};
  for (std::size_t n : step_sizes) {
    for (mode m : {mode::exact, mode::compressed}) {
      timed(benchmark::RegisterBenchmark(("onebit_adam/" + std::string(mode_name(m)) + "/" + size_label(n)).c_str(),
                                         [n, m](benchmark::State& s) { bm_step<mpopt::onebit_adam>(s, n, m); }),
            n);
    }
    timed(benchmark::RegisterBenchmark(("zero_one_adam/local/" + size_label(n)).c_str(),
                                       [n](benchmark::State& s) { bm_step<mpopt::zero_one_adam>(s, n, mode::local); }),
          n);
    for (mode m : {mode::exact, mode::compressed}) {
      timed(benchmark::RegisterBenchmark(("onebit_lamb/" + std::string(mode_name(m)) + "/" + size_label(n)).c_str(),
                                         [n, m](benchmark::State& s) { bm_step<mpopt::onebit_lamb>(s, n, m); }),
            n);
    }
    for (std::size_t bytes : {step_bytes_per_param<prec>(mode::exact), step_bytes_per_param<prec>(mode::compressed),
                              step_bytes_per_param<prec>(mode::local), lamb_step_bytes_per_param<prec>(mode::exact),
                              lamb_step_bytes_per_param<prec>(mode::compressed)}) {
      timed(benchmark::RegisterBenchmark(("copy/" + std::to_string(bytes) + "B/" + size_label(n)).c_str(),
                                         [n, bytes](benchmark::State& s) { copy_ceiling(s, n, bytes); }),
            n);
    }
  }
  int world = 8;  // the ranks simulated
  for (std::size_t n : {std::size_t(1) << 24, std::size_t(1) << 28}) {
    for (pass p : {pass::worker, pass::server, pass::decompress}) {
      timed(benchmark::RegisterBenchmark(
                ("compress/" + std::string(pass_name(p)) + "/W" + std::to_string(world) + "/" + size_label(n)).c_str(),
                [n, world, p](benchmark::State& s) { bm_compress(s, n, world, p); }),
            n);
    }
  }
  return mpopt_bench::run_registered(argc, argv);
}
