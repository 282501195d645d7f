// mpopt::cuda::muon_optimizer: mpopt::muon_optimizer (mpopt/muon.hpp) on the CUDA backend, on one GPU or with ZeRO
// stages 0-2 over a device-memory communicator (the host's semantics, below). The
// Newton–Schulz iterations are cuBLAS GEMMs, batched over matrices of equal shape and NS parameters
// (cublasGemmStridedBatchedEx; muon_gemm<bf16_t>: CUDA_R_16BF operands and results with CUBLAS_COMPUTE_32F,
// muon_gemm<float>: CUDA_R_32F with CUBLAS_COMPUTE_32F, no TF32); the elementwise work is the library's kernels,
// whose arithmetic is rule/muon.hpp's and host::update_elementwise's.
//
// A step is stream-ordered and never synchronises with the host (every decision is read from device memory):
//   1. the statistics pass over every grad and the step-scalars kernel (cuda/reduce.cuh, cuda/scalars.cuh): found_inf,
//      the scaler, the unscale + clip factor and the aux groups' AdamW coefficients, on the device;
//   2. per batch of equal-shape matrices: the momentum kernel (grad · factor into the buffer, the NS input u and
//      per-chunk sums of squares of u), the norm kernel (one block per matrix, chunks summed in order), the
//      normalise kernel (X = u / max(||u||, eps), rounded to the GEMM type), ns_steps x three GEMMs, and the update
//      kernel (decay and the orthogonalised step into master and param);
//   3. the aux groups' fused AdamW update (cuda/update.cuh).
// A skipped step (found_inf) still runs the GEMMs on the workspace, since the decision lives on the device; every
// kernel that writes state returns at once, so nothing the caller sees changes.
//
// Layout: no transposes. A row-major rows x cols matrix is, to column-major cuBLAS, Xᵀ (m x n, ld m) when it is wide
// and X (n x m, ld n) when it is tall, with X the n x m iterate (n = min). Each GEMM picks its op flags for that, so
// the normalised input, the iterates and the result all keep the matrix's own memory order:
//   wide:  A = Yᵀ·Y;  B = c·A·A + b·A;  Y' = Y·Bᵀ + a·Y      (Y = Xᵀ as stored)
//   tall:  A = X·Xᵀ;  B = c·A·A + b·A;  X' = B·X + a·X
// cuBLAS updates C in place, so the `b·A` and `a·X` terms are copies of A and X made just before (n² and n·m
// elements per iteration, a few % of the GEMMs' time at transformer sizes).
//
// Hyper-parameters: lr, weight_decay, momentum, nesterov, eps and adjust_lr can change (set_matrix_hparams writes
// them on the stream); ns_coefficients and ns_steps fix the batching and the GEMM scalars, so they cannot.
// Masters: a master<T, stochastic_rounding> or master<T, kahan_summation> rounds each update as the host optimizer
// does (policy/rounding.hpp), with its Philox key (rounding_seed; aux group g tagged g, as cuda::optimizer's groups,
// matrix group g tagged g | 2^15), counter (element index in the group, step) and compensation. The aux groups'
// masters are therefore the host's bit for bit (device arithmetic without fused multiply-adds, nvcc --fmad=false);
// the matrices' take the host's roundings of the cuBLAS update, which differs from the host's by the GEMMs' sums.
//
// ZeRO (zero_options, comm::nccl): as the host muon_optimizer, matrices stay whole. Every tensor has the host's owner
// (muon.hpp, detail::muon_layout). Stage 0: every rank holds and updates everything; grads are averaged group by
// group and the means all-gathered (every replica the same bits). Stages 1-2: the owner alone holds a tensor's master
// and states and updates it (its Newton–Schulz batches are its own matrices); step() reduces the grads to the owners
// through the owner-ordered layout, in buckets, and all-gathers the updated params; stage 2's reduce_grads() reduces
// tensors as their grads appear. The grad statistics' partials of every rank are all-gathered before the
// step-scalars kernel, so every rank decides alike (skip, clip factor). Stage 3 is refused. The collectives run on
// the communicator's stream, which must be the optimizer's: a step still never waits for the device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <cub/block/block_reduce.cuh>

#include "../comm/communicator.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../muon.hpp"
#include "../numeric/convert.hpp"
#include "../numeric/traits.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../policy/rounding.hpp"
#include "../rule/adam.hpp"
#include "../rule/muon.hpp"
#include "../scaler/scalers.hpp"
#include "../zero/partition.hpp"
#include "data_parallel.cuh"
#include "error.cuh"
#include "launch.cuh"
#include "memory.cuh"
#include "reduce.cuh"
#include "scalars.cuh"
#include "update.cuh"

namespace mpopt::cuda {

// ok for CUBLAS_STATUS_SUCCESS; otherwise errc::unsupported naming the call and cuBLAS's status.
inline status to_status(cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return status::success();
  return status{errc::unsupported, what + " failed: " + cublasGetStatusName(s) + ": " + cublasGetStatusString(s)};
}

// An owning cuBLAS handle; make_cublas_handle() throws mpopt::error when cuBLAS cannot create one.
using cublas_handle = unique_handle<cublasHandle_t, cublasDestroy>;
inline cublas_handle make_cublas_handle() {
  cublasHandle_t handle = nullptr;
  const cublasStatus_t s = cublasCreate(&handle);
  if (s != CUBLAS_STATUS_SUCCESS) throw error(to_status(s, "cublasCreate"));
  return cublas_handle(handle);
}

// The cuBLAS type of a GEMM operand.
template <class T>
inline constexpr cudaDataType_t cublas_type_v = std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;

// The per-matrix scalars of the elementwise kernels (device memory; set_matrix_hparams rewrites them).
struct muon_matrix_coeffs {
  muon::coeffs<float> k;
  float neg_lr;  // -adjusted_lr, rounded once (torch's alpha=)
  float eps;
};

inline muon_matrix_coeffs make_muon_coeffs(const muon::args& a, std::size_t rows, std::size_t cols) {
  return {muon::prepare<float>(a, 0), float(-muon::adjusted_lr(a, rows, cols)), float(a.eps)};
}

// One matrix of a batch: the caller's param and grad, the optimizer's master and momentum, and its slots in the
// batch workspace (u: the fp32 NS input; x: the NS result, of the GEMM type). All in the matrix's memory order. The
// last three fields serve a stochastic_rounding or kahan_summation master only (zero otherwise).
template <class Prec, class T>
struct muon_entry {
  const typename Prec::grad_t* grad;
  typename Prec::state_t* momentum;
  typename Prec::param_t* param;
  typename Prec::master_t* master;
  float* u;
  T* x;
  std::uint64_t n;
  std::uint32_t matrix;                   // index into the coefficient array and the batch's norms
  std::uint32_t vector_ok;                // every stream this entry touches is 16-byte aligned
  std::uint64_t first_index;              // the matrix's offset in its group: stochastic rounding's counter
  typename Prec::master_t* compensation;  // kahan_summation: the compensation of element 0
  std::uint32_t rounding_tag;             // muon_rounding_tag(muon_part::matrices, its group)
};

// The host's master_store_ctx of a matrix (muon_optimizer::rounding_ctx); seed and step from device memory, as
// update.cuh's master_ctx.
template <class Prec, class T>
MPOPT_DEVICE MPOPT_FORCEINLINE master_store_ctx<typename Prec::master_t> muon_master_ctx(const muon_entry<Prec, T>& t,
                                                                                         const step_core& core) {
  return make_master_store_ctx(group_rounding_key(core.rounding_seed, t.rounding_tag), std::uint64_t(core.step),
                               t.first_index, t.compensation);
}

// Elements per thread: 16 bytes of the narrowest stream.
template <class Prec, class T>
inline constexpr int muon_vector_width = elements_per_vector<typename Prec::param_t, typename Prec::master_t,
                                                             typename Prec::grad_t, typename Prec::state_t, T, float>;

namespace detail {

// The momentum pass of W elements at i; accumulates the squares of u (double, as the host's norm).
template <class Prec, class T>
struct muon_momentum_op {
  using C = typename Prec::compute_t;
  muon_entry<Prec, T> t;
  muon::coeffs<C> k;
  C factor;
  double sum = 0.0;

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) {
    const vec<typename Prec::grad_t, W> g = load<typename Prec::grad_t, W>(t.grad + i);
    vec<typename Prec::state_t, W> b = load<typename Prec::state_t, W>(t.momentum + i);
    vec<float, W> u;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const C ge = convert<C>(g.v[e]) * factor;
      C be = convert<C>(b.v[e]);
      muon::update_buffer(k, ge, be);
      b.v[e] = convert<typename Prec::state_t>(be);
      u.v[e] = muon::ns_input(k, ge, convert<C>(b.v[e]));  // from the stored (rounded) buffer, as the host
      sum += double(u.v[e]) * double(u.v[e]);
    }
    store<typename Prec::state_t, W>(t.momentum + i, b);
    store<float, W>(t.u + i, u);
  }
};

template <class Prec, class T>
struct muon_normalise_op {
  muon_entry<Prec, T> t;
  float denom;

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) const {
    const vec<float, W> u = load<float, W>(t.u + i);
    vec<T, W> x;
#pragma unroll
    for (int e = 0; e < W; ++e) x.v[e] = convert<T>(u.v[e] / denom);
    store<T, W>(t.x + i, x);
  }
};

template <class Prec, class T>
struct muon_apply_op {
  using C = typename Prec::compute_t;
  using master_t = typename Prec::master_t;
  muon_entry<Prec, T> t;
  muon::coeffs<C> k;
  C neg_lr;
  master_store_ctx<master_t> ctx;  // muon_master_ctx(t, core); unused (not even set) with nearest_rounding

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) const {
    using param_t = typename Prec::param_t;
    const vec<T, W> x = load<T, W>(t.x + i);
    vec<master_t, W> m = load<master_t, W>(t.master + i);
    vec<param_t, W> p;
    master_store<Prec, W> rounding(t, i);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      C w = convert<C>(m.v[e]);
      const C w_old = w;
      muon::apply_update(k, w, convert<C>(x.v[e]), neg_lr);
      m.v[e] = rounding.round(w, w_old, ctx, i, e);  // rounded once; the param copy is that master, rounded
      if constexpr (Prec::separate_master) p.v[e] = convert<param_t>(m.v[e]);
    }
    store<master_t, W>(t.master + i, m);
    rounding.finish(t, i);
    if constexpr (Prec::separate_master) store<param_t, W>(t.param + i, p);
  }
};

}  // namespace detail

// Momentum and NS input of every entry; partial[c] is the sum of squares of u over chunk c (written for every chunk,
// so the norm kernel reads no stale value). Returns at once on a skipped step.
template <class Prec, class T>
__global__ void __launch_bounds__(block_threads)
    muon_momentum_kernel(const muon_entry<Prec, T>* entries, chunk_map map, const muon_matrix_coeffs* coeffs,
                         const step_core* core, double* partial) {
  if (!core->applied) return;
  using C = typename Prec::compute_t;
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  constexpr int V = muon_vector_width<Prec, T>;
  detail::muon_momentum_op<Prec, T> op;
  op.factor = C(core->grad_factor);
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.k = coeffs[op.t.matrix].k;
    op.sum = 0.0;
    std::uint64_t begin, end;
    mpopt::cuda::detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<V>(begin, end, op.t.vector_ok != 0, op);
    const double s = reduce(temp).Sum(op.sum);
    if (threadIdx.x == 0) partial[c] = s;
    __syncthreads();  // temp is reused by the next chunk
  }
}

// <<<entries, block_threads>>>: denom[e] = max(sqrt(sum of entry e's chunk partials, in order), eps), rounded once to
// float, as host::newton_schulz.
template <class Prec, class T>
__global__ void __launch_bounds__(block_threads)
    muon_norm_kernel(const muon_entry<Prec, T>* entries, chunk_map map, const muon_matrix_coeffs* coeffs,
                     const step_core* core, const double* partial, float* denom) {
  if (!core->applied) return;
  const std::uint32_t e = blockIdx.x;
  double s = 0.0;
  for (std::uint64_t c = map.chunk_begin[e] + threadIdx.x; c < map.chunk_begin[e + 1]; c += block_threads)
    s += partial[c];
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  s = reduce(temp).Sum(s);
  if (threadIdx.x == 0) {
    const double norm = ::sqrt(s), eps = double(coeffs[entries[e].matrix].eps);
    denom[e] = float(norm > eps ? norm : eps);
  }
}

template <class Prec, class T>
__global__ void __launch_bounds__(block_threads)
    muon_normalise_kernel(const muon_entry<Prec, T>* entries, chunk_map map, const step_core* core,
                          const float* denom) {
  if (!core->applied) return;
  constexpr int V = muon_vector_width<Prec, T>;
  detail::muon_normalise_op<Prec, T> op;
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.denom = denom[e];
    std::uint64_t begin, end;
    mpopt::cuda::detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<V>(begin, end, op.t.vector_ok != 0, op);
  }
}

template <class Prec, class T>
__global__ void __launch_bounds__(block_threads)
    muon_apply_kernel(const muon_entry<Prec, T>* entries, chunk_map map, const muon_matrix_coeffs* coeffs,
                      const step_core* core) {
  if (!core->applied) return;
  constexpr int V = muon_vector_width<Prec, T>;
  detail::muon_apply_op<Prec, T> op;
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.k = coeffs[op.t.matrix].k;
    op.neg_lr = coeffs[op.t.matrix].neg_lr;
    if constexpr (mpopt::cuda::detail::needs_master_ctx_v<Prec>) op.ctx = muon_master_ctx(op.t, *core);
    std::uint64_t begin, end;
    mpopt::cuda::detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<V>(begin, end, op.t.vector_ok != 0, op);
  }
}

template <class Prec, class Scaler = no_scaler, class Gemm = muon_gemm<float>>
class muon_optimizer {
  static_assert(is_precision<Prec>::value,
                "mpopt::cuda::muon_optimizer: the 1st argument must be an mpopt::precision<param<..>, master<..>, "
                "grad<..>, state<..>>");
  static_assert(std::is_same_v<typename Prec::compute_t, float>,
                "mpopt::cuda::muon_optimizer: the compute type must be float");
  static_assert(std::is_same_v<Gemm, muon_gemm<float>> || std::is_same_v<Gemm, muon_gemm<bf16_t>>,
                "mpopt::cuda::muon_optimizer: the 3rd argument must be muon_gemm<float> or muon_gemm<bf16_t>");

 public:
  using precision_type = Prec;
  using scaler_type = Scaler;
  using gemm_type = Gemm;
  using scaler_args = typename Scaler::args;
  using scaler_state_type = typename Scaler::state_type;
  using param_t = typename Prec::param_t;
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;
  using compute_t = typename Prec::compute_t;
  using gemm_t = typename Gemm::type;
  using matrix_group_type = muon_group<Prec>;
  using aux_group_type = param_group<adamw, Prec>;
  using scalars_type = step_scalars<scaler_state_type>;

  // One GPU. Device pointers in the groups. Validates as the host optimizer does (same messages) plus alignment of
  // params and grads to their element size; allocates the masters, states, a kahan_summation master's compensation
  // and the Newton–Schulz workspace (sized for the largest batch) on the current device, initialises them on `stream`
  // (the compensation to 0) and waits for that: construction is the one place that synchronises. Throws mpopt::error.
  explicit muon_optimizer(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux = {},
                          scaler_args scaler = {}, step_options options = {}, cudaStream_t stream = nullptr)
      : scaler_args_(scaler), options_(options) {
    init(std::move(matrices), std::move(aux), stream);
  }

  // ZeRO stages 0-2 over `comm`, a device-memory communicator (comm::nccl) that outlives the optimizer, with the host
  // muon_optimizer's semantics (muon.hpp): whole matrices, each tensor updated by its owner (stages 1-2: held only
  // there), grads reduced to the owners in fp32 (fp64 for fp32 grads), params all-gathered. `stream` must be the
  // communicator's, here and in every step() and reduce_grads(). Collective: every rank constructs with the same
  // layout (checked) and the same initial params. Stage 3 is refused, as on the host.
  muon_optimizer(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux, comm::communicator& comm,
                 zero_options zero, scaler_args scaler = {}, step_options options = {}, cudaStream_t stream = nullptr)
      : comm_(&comm), zero_(zero), scaler_args_(scaler), options_(options) {
    if (comm.memory() != comm::memory_space::device)
      throw error(status::invalid("cuda::muon_optimizer needs a device-memory communicator (nccl), got " + comm.name() +
                                  "; host memory goes to mpopt::muon_optimizer"));
    detail::check_comm_stream(comm, stream, "construction");
    throw_if_error(mpopt::detail::validate_zero_options(zero_));
    if (zero_.stage == 3)
      throw error(
          status{errc::unsupported, std::string("cuda::muon_optimizer: ") + mpopt::detail::muon_stage3_refused});
    rank_ = comm.rank();
    world_ = comm.size();
    init(std::move(matrices), std::move(aux), stream);
  }

  muon_optimizer(const muon_optimizer&) = delete;
  muon_optimizer& operator=(const muon_optimizer&) = delete;
  muon_optimizer(muon_optimizer&&) noexcept = default;
  muon_optimizer& operator=(muon_optimizer&&) noexcept = default;
  ~muon_optimizer() = default;

  // Enqueues one whole step on `stream` without synchronising: with a communicator first the grad reduction (unless
  // reduce_grads() fed this step), and at stages 1-2 last the param all-gather. A launch or cuBLAS failure is kept
  // in last_error(); a collective that cannot be enqueued, or stage 2 without grads, throws mpopt::error.
  void step(cudaStream_t stream) {
    last_error_ = std::exchange(pending_error_, status::success());
    if (comm_ != nullptr) {
      detail::check_comm_stream(*comm_, stream, "step");
      if (!has_reduced_) {
        exchange_grads(stream);
        has_reduced_ = zero_.stage >= 2;  // what the exchange wrote is consumed (zeroed) after this step
      }
    }
    const std::uint32_t offset = sharded() ? std::uint32_t(rank_) * stats_grid_ : 0u;
    const std::uint32_t count = sharded() ? std::uint32_t(world_) * stats_grid_ : stats_grid_;
    const status scalars_status = enqueue_step_scalars<adamw, Scaler, compute_t>(
        stats_, stats_grid_, stats_partials{partial_sum_.get(), partial_flag_.get(), offset, count}, scaler_args_,
        options_d_.get(), scalars_.get(), aux_args_d_.get(), aux_coeffs_d_.get(), std::uint32_t(aux_.size()), stream,
        [&] {
          if (!sharded()) return;
          comm_->all_gather_bytes(partial_sum_.get(), stats_grid_ * sizeof(double));
          comm_->all_gather_bytes(partial_flag_.get(), stats_grid_ * sizeof(int));
        });
    if (last_error_.ok()) last_error_ = scalars_status;
    const step_core* core = reinterpret_cast<const step_core*>(scalars_.get());
    note_cublas(cublasSetStream(blas_.get(), stream), "cublasSetStream");
    for (const batch& b : batches_) run_batch(b, core, stream);
    for (const aux_part& part : aux_parts_) {
      dispatch_state_count<2, 3>(part.num_states, [&](auto ns) {
        note(launch_update<adamw, Prec, decltype(ns)::value, adamw::max_states>(
                 part.table.entries(), part.table.map(), part.grid, aux_coeffs_d_.get(), core, stream),
             "step: launch of the aux update kernel");
      });
    }
    // A skipped step gathers unchanged params: cheaper than a host synchronisation to learn that it skipped.
    if (sharded()) publish_params(stream);
    if (has_reduced_) {
      for (const std::vector<storage>* part : {&matrix_storage_, &aux_storage_})
        for (const storage& s : *part)
          if (s.reduced.size() > 0)
            note(cudaMemsetAsync(s.reduced.get(), 0, s.reduced.bytes(), stream), "step: cudaMemsetAsync (grads)");
      has_reduced_ = false;
    }
  }

  // Stage 2: reduces (mean over ranks) the grads of tensors [first, last) of group g, `grads` (device memory) holding
  // their elements contiguously, to their owners, adding them to what was reduced since the last step; the next
  // step() consumes them. Collective; enqueued on `stream` (the communicator's), after which the caller may reuse
  // `grads` in stream order. G may differ from grad_t (micro-batch grads in the model's dtype).
  template <class G>
  void reduce_grads(muon_part part, std::size_t g, std::size_t first, std::size_t last, const G* grads,
                    cudaStream_t stream) {
    static_assert(is_element_type_v<G>,
                  "mpopt::cuda::muon_optimizer::reduce_grads: grads must point to float, double, half_t or bf16_t");
    mpopt::detail::check_muon_stage_for_reduce_grads(zero_.stage);
    detail::check_comm_stream(*comm_, stream, "reduce_grads");
    check_group(part, g);
    mpopt::detail::check_muon_tensor_range(part, g, first, last, layout_.count(part, g), "reduce_grads");
    if (first == last) return;
    const std::size_t base = info(part, g, first).offset;
    for (std::size_t t = first; t < last; ++t) {
      const tensor_info& it = info(part, g, t);
      if (it.size > 0 && grads == nullptr) throw error(status::invalid("reduce_grads: grads is null"));
      reduce_to_owner(it, grads + (it.offset - base), stream);
    }
    has_reduced_ = true;
  }

  const status& last_error() const noexcept { return last_error_; }

  // The outcome of the latest step() on `stream`: copies the step scalars back and waits for the stream.
  step_result result(cudaStream_t stream) const { return read_step_result(scalars_.get(), last_error_, stream); }

  std::size_t num_matrix_groups() const noexcept { return matrices_.size(); }
  std::size_t num_aux_groups() const noexcept { return aux_.size(); }
  const muon::args& matrix_hparams(std::size_t g) const { return matrices_.at(g).hparams; }
  const adamw::args& aux_hparams(std::size_t g) const { return aux_.at(g).hparams; }
  // The groups as constructed (device pointers) and the scaler's arguments: checkpoint metadata.
  const matrix_group_type& matrix_group(std::size_t g) const {
    check_group(muon_part::matrices, g);
    return matrices_[g];
  }
  const aux_group_type& aux_group(std::size_t g) const {
    check_group(muon_part::aux, g);
    return aux_[g];
  }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }
  const zero_options& zero() const noexcept { return zero_; }
  // ZeRO's communicator; null when constructed without one.
  comm::communicator* communicator() const noexcept { return comm_; }

  // Synchronising accessors of the step counter and the scaler state (checkpoint/cuda_muon.cuh): they wait for
  // `stream`; the setters write on it (the scale the next backward reads too).
  std::int64_t step_count(cudaStream_t stream) const { return read_step_count(scalars_.get(), stream); }
  void set_step_count(std::int64_t step, cudaStream_t stream) { write_step_count(scalars_.get(), step, stream); }
  scaler_state_type scaler_state(cudaStream_t stream) const { return read_scaler_state(scalars_.get(), stream); }
  void set_scaler_state(const scaler_state_type& s, cudaStream_t stream) {
    write_scaler_state<Scaler>(scalars_.get(), s, scaler_args_, stream);
  }

  // Validated first (the host's messages), then written on `stream`.
  void set_matrix_hparams(std::size_t g, const muon::args& a, cudaStream_t stream) {
    check_group(muon_part::matrices, g);
    status s = muon::validate(a);
    if (!s.ok()) s.message = "matrix group " + std::to_string(g) + ": " + s.message;
    throw_if_error(s);
    if (!mpopt::detail::same_newton_schulz(a, matrices_[g].hparams))
      throw error(status{errc::unsupported, "matrix group " + std::to_string(g) +
                                                ": ns_steps and ns_coefficients fix the GEMM batches and cannot "
                                                "change after construction on the CUDA backend"});
    // Matrices come first in the layout: tensor index i is matrix i's coefficient slot.
    for (std::size_t i = layout_.first(muon_part::matrices, g); i < layout_.first(muon_part::matrices, g + 1); ++i) {
      const tensor_info& it = layout_.tensors[i];
      store_value_kernel<muon_matrix_coeffs>
          <<<1, 1, 0, stream>>>(coeffs_d_.get() + i, make_muon_coeffs(a, it.rows, it.cols));
      throw_if_cuda_error(cudaGetLastError(), "set_matrix_hparams: launch of the store kernel");
    }
    matrices_[g].hparams = a;
  }
  void set_aux_hparams(std::size_t g, const adamw::args& a, cudaStream_t stream) {
    check_group(muon_part::aux, g);
    status s = adamw::validate(a);
    if (!s.ok()) s.message = "aux group " + std::to_string(g) + ": " + s.message;
    throw_if_error(s);
    if (adamw::num_states(a) != adamw::num_states(aux_[g].hparams))
      throw error(status::invalid("aux group " + std::to_string(g) +
                                  ": changing the number of optimizer states (amsgrad on/off) after construction is "
                                  "not supported"));
    store_value_kernel<adamw::args><<<1, 1, 0, stream>>>(aux_args_d_.get() + g, a);
    throw_if_cuda_error(cudaGetLastError(), "set_aux_hparams: launch of the store kernel");
    aux_[g].hparams = a;
  }

  // max_grad_norm, deepspeed_scale_order and rounding_seed (the key of a stochastic_rounding master), as the host's.
  const step_options& options() const noexcept { return options_; }
  // Validated, then written on `stream` (store_step_options).
  void set_options(const step_options& o, cudaStream_t stream) {
    store_step_options(options_d_.get(), o, stream);
    options_ = o;
  }

  // Group g's tensors (matrices, or aux tensors: one when the group has no tensor_sizes), their sizes, owners and
  // whether this rank holds their master and states (every rank at stage 0 or on one GPU; the owner at stages 1-2).
  std::size_t num_tensors(muon_part part, std::size_t g) const {
    check_group(part, g);
    return layout_.count(part, g);
  }
  std::size_t tensor_size(muon_part part, std::size_t g, std::size_t t) const { return info(part, g, t).size; }
  int owner(muon_part part, std::size_t g, std::size_t t) const { return info(part, g, t).owner; }
  bool holds(muon_part part, std::size_t g, std::size_t t) const { return info(part, g, t).held; }
  int num_states(muon_part part, std::size_t g) const {
    check_group(part, g);
    return part == muon_part::matrices ? muon::max_states : adamw::num_states(aux_[g].hparams);
  }

  // Device pointers of a held tensor t of group g: its master (in the param buffer when the policy has none
  // separate), state j (matrices: 0, the momentum buffer; aux: AdamW's states) and a kahan_summation master's
  // compensation (null with another master rounding). They throw for a tensor another rank holds.
  master_t* master(muon_part part, std::size_t g, std::size_t t) const {
    return master_of(held_info(part, g, t, "master"));
  }
  state_t* state(muon_part part, std::size_t g, std::size_t t, int j) const {
    check_state_index(part, g, j, "state");
    return state_of(held_info(part, g, t, "state"), j);
  }
  master_t* compensation(muon_part part, std::size_t g, std::size_t t) const {
    return compensation_of(held_info(part, g, t, "compensation"));
  }
  // The same for the whole of group g, flat, when this rank holds all of it (always at stage 0 or on one GPU).
  master_t* master(muon_part part, std::size_t g) const {
    whole_group(part, g, "master");
    if constexpr (Prec::separate_master) {
      return storage_of(part, g).master.get();
    } else {
      return part == muon_part::matrices ? matrices_[g].params : aux_[g].params;
    }
  }
  state_t* state(muon_part part, std::size_t g, int j) const {
    check_state_index(part, g, j, "state");
    const storage& s = storage_of(part, whole_group(part, g, "state"));
    return s.states[std::size_t(j)].get();
  }
  master_t* compensation(muon_part part, std::size_t g) const {
    return storage_of(part, whole_group(part, g, "compensation")).compensation.get();
  }

  // Bytes this rank holds, by role (as the host muon_optimizer::memory; workspace includes the Newton–Schulz
  // buffers and the collectives' staging).
  memory_report memory() const {
    memory_report m;
    std::size_t total = 0, reduced = 0;
    for (const tensor_info& it : layout_.tensors) total += it.size;
    for (const std::vector<storage>* part : {&matrix_storage_, &aux_storage_})
      for (const storage& s : *part) {
        reduced += s.reduced.size();
        m.master += (s.master.size() + s.compensation.size()) * sizeof(master_t);
        for (const auto& st : s.states) m.states += st.bytes();
      }
    m.params = total * sizeof(param_t);
    if (zero_.stage >= 2) {
      m.grads = reduced * sizeof(grad_t);
    } else {
      m.grads = total * sizeof(grad_t);
      m.workspace += reduced * sizeof(grad_t);
    }
    m.workspace += workspace_bytes() + send_.bytes() + recv_.bytes() + param_stage_.bytes() + mean_.bytes();
    return m;
  }

  // Multiply-adds of the Newton–Schulz GEMMs this rank runs per applied step (for throughput figures).
  double ns_multiply_adds_per_step() const {
    double total = 0;
    for (const batch& b : batches_)
      total += double(b.count) * double(b.ns_steps) * host::ns_multiply_adds(b.rows, b.cols);
    return total;
  }
  // Bytes of the Newton–Schulz workspace (shared by the batches, sized for the largest).
  std::size_t workspace_bytes() const noexcept {
    return x_[0].bytes() + x_[1].bytes() + gram_.bytes() + poly_.bytes() + u_.bytes() + chunk_partial_.bytes() +
           denom_.bytes();
  }

 private:
  using entry_type = muon_entry<Prec, gemm_t>;
  using aux_entry_type = tensor_entry<Prec, adamw::max_states>;
  using reduce_type = mpopt::detail::reduce_t<grad_t>;

  // One tensor (mpopt::detail::muon_tensor) and where this rank keeps it.
  struct tensor_info : mpopt::detail::muon_tensor {
    bool held = false;
    std::size_t local = 0;  // offset in its group's storage (held tensors in order)
  };

  // One group's held tensors, in tensor order.
  struct storage {
    device_buffer<master_t> master;        // empty when the param buffer is the master
    device_buffer<master_t> compensation;  // kahan_summation only: what rounding dropped, per element
    std::vector<device_buffer<state_t>> states;
    device_buffer<grad_t> reduced;  // with a communicator: the mean grads the step reads
  };

  // Matrices of one shape and one set of NS parameters, iterated together.
  struct batch {
    std::size_t rows = 0, cols = 0, count = 0;
    int ns_steps = 0;
    float a = 0, b = 0, c = 0;
    device_table<entry_type> table;
    std::uint32_t grid = 0;
  };

  struct aux_part {
    int num_states = 0;
    device_table<aux_entry_type> table;
    std::uint32_t grid = 0;
  };

  template <class T>
  static status check_alignment(const T* p, const char* part, std::size_t g) {
    if (p == nullptr || is_aligned(p, sizeof(T))) return status::success();
    return status::invalid(std::string(part) + " group " + std::to_string(g) +
                           ": a buffer is not aligned to its element size (" + std::to_string(sizeof(T)) + " bytes)");
  }

  bool sharded() const noexcept { return comm_ != nullptr && zero_.stage >= 1 && world_ > 1; }
  // With a communicator the step reads reduced grads (stage 2 accumulates them even on one rank).
  bool uses_reduced() const noexcept { return comm_ != nullptr && (world_ > 1 || zero_.stage >= 2); }

  void check_group(muon_part part, std::size_t g) const {
    mpopt::detail::check_muon_group(part, g, part == muon_part::matrices ? matrices_.size() : aux_.size());
  }
  void check_state_index(muon_part part, std::size_t g, int j, const char* what) const {
    mpopt::detail::check_muon_state_index(part, g, j, num_states(part, g), what);
  }
  const tensor_info& info(muon_part part, std::size_t g, std::size_t t, const char* what = "tensor") const {
    check_group(part, g);
    mpopt::detail::check_muon_tensor(part, g, t, layout_.count(part, g), what);
    return layout_.tensors[layout_.first(part, g) + t];
  }
  const tensor_info& held_info(muon_part part, std::size_t g, std::size_t t, const char* what) const {
    const tensor_info& it = info(part, g, t, what);
    mpopt::detail::check_muon_held(it, it.held, rank_, what);
    return it;
  }
  // g, after checking that this rank holds every tensor of it.
  std::size_t whole_group(muon_part part, std::size_t g, const char* what) const {
    check_group(part, g);
    for (std::size_t i = layout_.first(part, g); i < layout_.first(part, g + 1); ++i)
      if (!layout_.tensors[i].held)
        throw error(status::invalid(std::string(what) + ": " + mpopt::detail::muon_part_name(part) + " group " +
                                    std::to_string(g) + " is split over the ranks (ZeRO stage " +
                                    std::to_string(zero_.stage) + "); use " + what +
                                    "(part, g, t, ...) for the tensors this rank holds"));
    return g;
  }

  const storage& storage_of(muon_part part, std::size_t g) const {
    return part == muon_part::matrices ? matrix_storage_[g] : aux_storage_[g];
  }
  param_t* params_of(const tensor_info& it) const {
    return (it.part == muon_part::matrices ? matrices_[it.group].params : aux_[it.group].params) + it.offset;
  }
  const grad_t* caller_grads(const tensor_info& it) const {
    const grad_t* g = it.part == muon_part::matrices ? matrices_[it.group].grads : aux_[it.group].grads;
    return g == nullptr ? nullptr : g + it.offset;
  }
  grad_t* reduced_of(const tensor_info& it) const { return storage_of(it.part, it.group).reduced.get() + it.local; }
  // The grads the step reads.
  const grad_t* step_grads(const tensor_info& it) const { return uses_reduced() ? reduced_of(it) : caller_grads(it); }
  master_t* master_of(const tensor_info& it) const {
    if constexpr (Prec::separate_master) {
      return storage_of(it.part, it.group).master.get() + it.local;
    } else {
      return params_of(it);
    }
  }
  state_t* state_of(const tensor_info& it, int j) const {
    return storage_of(it.part, it.group).states[std::size_t(j)].get() + it.local;
  }
  master_t* compensation_of(const tensor_info& it) const {
    master_t* c = storage_of(it.part, it.group).compensation.get();
    return c == nullptr ? nullptr : c + it.local;
  }

  void note(cudaError_t err, const char* what) { detail::keep_first_error(last_error_, err, what); }
  void note_cublas(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS && last_error_.ok()) last_error_ = to_status(s, what);
  }

  // Construction after the members are set: validation (the host's order and messages), the layout check across
  // ranks, placement, storage, tables, workspace and the device step state.
  void init(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux, cudaStream_t stream) {
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(options_));
    const bool grads_required = zero_.stage < 2;
    for (std::size_t g = 0; g < matrices.size(); ++g) {
      throw_if_error(mpopt::detail::validate_muon_group(matrices[g], g, grads_required));
      throw_if_error(check_alignment(matrices[g].params, "matrix", g));
      throw_if_error(check_alignment(matrices[g].grads, "matrix", g));
    }
    for (std::size_t g = 0; g < aux.size(); ++g) {
      throw_if_error(mpopt::detail::validate_aux_group(aux[g], g, grads_required));
      throw_if_error(check_alignment(aux[g].params, "aux", g));
      throw_if_error(check_alignment(aux[g].grads, "aux", g));
    }
    matrices_ = std::move(matrices);
    aux_ = std::move(aux);
    if (comm_ != nullptr && world_ > 1) {
      double v[4];
      mpopt::detail::muon_layout_words(zero_.stage, matrices_, aux_, v);
      detail::check_same_words(*comm_, v, mpopt::detail::muon_layout_what, stream);
    }
    layout_ = mpopt::detail::muon_layout<tensor_info>(matrices_, aux_, world_);
    std::vector<std::size_t> held(matrices_.size() + aux_.size(), 0);
    for (tensor_info& it : layout_.tensors) {
      it.held = !sharded() || it.owner == rank_;
      if (!it.held) continue;
      std::size_t& next = held[(it.part == muon_part::matrices ? 0 : matrices_.size()) + it.group];
      it.local = next;
      next += it.size;
    }
    allocate_states(held, stream);
    build_batches(stream);
    build_aux_tables();
    build_stats_table();
    allocate_exchange();

    init_step_state<Scaler>(options_, scaler_args_, options_d_, scalars_, stream);
    if (!aux_.empty()) {
      std::vector<adamw::args> args;
      for (const aux_group_type& a : aux_) args.push_back(a.hparams);
      aux_args_d_ = device_buffer<adamw::args>(args.size(), "aux hyper-parameters");
      aux_coeffs_d_ = device_buffer<adamw::coeffs<compute_t>>(args.size(), "aux coefficients");
      detail::copy_to_device(aux_args_d_.get(), args.data(), aux_args_d_.bytes(), "aux hyper-parameters", stream);
    }
    throw_if_cuda_error(cudaStreamSynchronize(stream), "cudaStreamSynchronize (muon_optimizer construction)");
  }

  // held[k]: elements this rank holds of group k (matrix groups, then aux groups).
  void allocate_states(const std::vector<std::size_t>& held, cudaStream_t stream) {
    auto make = [&](muon_part part, std::size_t g, std::size_t n, int num_states) {
      const std::string where = std::string(mpopt::detail::muon_part_name(part)) + " group " + std::to_string(g);
      storage s;
      if constexpr (Prec::separate_master) {
        s.master = device_buffer<master_t>(n, "master of " + where);
        for (std::size_t i = layout_.first(part, g); i < layout_.first(part, g + 1); ++i) {
          const tensor_info& it = layout_.tensors[i];
          if (it.held)
            throw_if_cuda_error(launch_convert(s.master.get() + it.local, params_of(it), it.size, stream),
                                "launch of the initialisation of the master of " + where);
        }
      }
      if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
        s.compensation = filled_buffer<master_t>(n, master_t{}, "compensation of " + where, stream);
      for (int j = 0; j < num_states; ++j)
        s.states.push_back(
            filled_buffer<state_t>(n, state_t(0.0f), "state " + std::to_string(j) + " of " + where, stream));
      // Zero: stage 2 accumulates into it.
      if (uses_reduced()) s.reduced = filled_buffer<grad_t>(n, grad_t{}, "reduced grads of " + where, stream);
      return s;
    };
    for (std::size_t g = 0; g < matrices_.size(); ++g)
      matrix_storage_.push_back(make(muon_part::matrices, g, held[g], muon::max_states));
    for (std::size_t g = 0; g < aux_.size(); ++g)
      aux_storage_.push_back(make(muon_part::aux, g, held[matrices_.size() + g], adamw::num_states(aux_[g].hparams)));
  }

  // f(first tensor, elements) for each run of consecutive tensors of group g that `keep` selects: one table entry
  // each (runs of held tensors are contiguous in the group and in its storage alike).
  template <class Keep, class F>
  void for_each_run(muon_part part, std::size_t g, Keep&& keep, F&& f) const {
    const std::size_t end = layout_.first(part, g + 1);
    for (std::size_t i = layout_.first(part, g); i < end;) {
      if (!keep(layout_.tensors[i])) {
        ++i;
        continue;
      }
      std::size_t n = 0, j = i;
      for (; j < end && keep(layout_.tensors[j]); ++j) n += layout_.tensors[j].size;
      if (n > 0) f(layout_.tensors[i], n);
      i = j;
    }
  }

  // Batches of the held matrices by (shape, NS parameters), in order of first appearance; the workspace is sized for
  // the largest.
  void build_batches(cudaStream_t stream) {
    std::vector<std::vector<const tensor_info*>> members;
    std::vector<muon_matrix_coeffs> coeffs;
    for (std::size_t i = 0; i < layout_.aux_first[0]; ++i) {  // every matrix's coefficients, held or not
      const tensor_info& it = layout_.tensors[i];
      const muon::args& hp = matrices_[it.group].hparams;
      coeffs.push_back(make_muon_coeffs(hp, it.rows, it.cols));
      if (!it.held) continue;
      std::size_t k = 0;
      for (; k < batches_.size(); ++k) {
        const batch& b = batches_[k];
        if (b.rows == it.rows && b.cols == it.cols && b.ns_steps == hp.ns_steps && b.a == float(hp.ns_coefficients.a) &&
            b.b == float(hp.ns_coefficients.b) && b.c == float(hp.ns_coefficients.c))
          break;
      }
      if (k == batches_.size()) {
        batch b;
        b.rows = it.rows;
        b.cols = it.cols;
        b.ns_steps = hp.ns_steps;
        b.a = float(hp.ns_coefficients.a);
        b.b = float(hp.ns_coefficients.b);
        b.c = float(hp.ns_coefficients.c);
        batches_.push_back(std::move(b));
        members.emplace_back();
      }
      ++batches_[k].count;
      members[k].push_back(&it);
    }
    coeffs_d_ = detail::upload(coeffs, "muon coefficients");
    std::size_t most_nm = 0, most_nn = 0, most_count = 0;
    for (const batch& b : batches_) {
      const std::size_t n = std::min(b.rows, b.cols), m = std::max(b.rows, b.cols);
      most_nm = std::max(most_nm, b.count * n * m);
      most_nn = std::max(most_nn, b.count * n * n);
      most_count = std::max(most_count, b.count);
    }
    x_[0] = device_buffer<gemm_t>(most_nm, "Newton-Schulz iterate");
    x_[1] = device_buffer<gemm_t>(most_nm, "Newton-Schulz iterate");
    gram_ = device_buffer<gemm_t>(most_nn, "Newton-Schulz Gram matrix");
    poly_ = device_buffer<gemm_t>(most_nn, "Newton-Schulz polynomial");
    u_ = device_buffer<float>(most_nm, "Newton-Schulz input");
    denom_ = device_buffer<float>(most_count, "Newton-Schulz norms");
    // Initialised, so that the GEMMs of a skipped first step read defined values.
    auto zero = [stream](void* p, std::size_t bytes, const char* what) {
      if (bytes > 0)
        throw_if_cuda_error(cudaMemsetAsync(p, 0, bytes, stream), std::string("cudaMemsetAsync(") + what + ")");
    };
    zero(x_[0].get(), x_[0].bytes(), "Newton-Schulz iterate");
    zero(x_[1].get(), x_[1].bytes(), "Newton-Schulz iterate");
    zero(gram_.get(), gram_.bytes(), "Newton-Schulz Gram matrix");
    zero(poly_.get(), poly_.bytes(), "Newton-Schulz polynomial");
    zero(u_.get(), u_.bytes(), "Newton-Schulz input");

    std::uint64_t most_chunks = 0;
    for (std::size_t k = 0; k < batches_.size(); ++k) {
      batch& b = batches_[k];
      const std::size_t nm = b.rows * b.cols;
      // The NS result is in x_[ns_steps % 2]: the normalised input goes to x_[0], each iteration to the other.
      gemm_t* result = x_[std::size_t(b.ns_steps % 2)].get();
      std::vector<entry_type> entries;
      for (std::size_t slot = 0; slot < members[k].size(); ++slot) {
        const tensor_info& it = *members[k][slot];
        entry_type e{};
        e.grad = step_grads(it);
        e.momentum = state_of(it, 0);
        e.param = params_of(it);
        e.master = master_of(it);
        e.u = u_.get() + slot * nm;
        e.x = result + slot * nm;
        e.n = nm;
        e.matrix = std::uint32_t(&it - layout_.tensors.data());
        e.first_index = it.offset;
        e.rounding_tag = std::uint32_t(muon_rounding_tag(muon_part::matrices, it.group));
        e.compensation = compensation_of(it);
        const bool aligned = is_aligned(e.grad, vector_bytes) && is_aligned(e.momentum, vector_bytes) &&
                             is_aligned(e.master, vector_bytes) && is_aligned(e.u, vector_bytes) &&
                             is_aligned(e.x, vector_bytes) && is_aligned(x_[0].get() + slot * nm, vector_bytes) &&
                             (!Prec::separate_master || is_aligned(e.param, vector_bytes)) &&
                             is_aligned(e.compensation, vector_bytes);
        e.vector_ok = aligned ? 1u : 0u;
        entries.push_back(e);
      }
      // The normalise kernel writes x_[0]; its entries differ from the others only in x.
      b.table = device_table<entry_type>(entries, std::uint32_t(block_threads) * muon_vector_width<Prec, gemm_t> * 4,
                                         "muon batch");
      b.grid =
          grid_for(resident_blocks(muon_momentum_kernel<Prec, gemm_t>, "muon momentum"), b.table.map().total_chunks);
      most_chunks = std::max(most_chunks, b.table.map().total_chunks);
      if (b.ns_steps % 2 != 0) {  // the normalise kernel's entries point at x_[0]
        for (std::size_t slot = 0; slot < entries.size(); ++slot) entries[slot].x = x_[0].get() + slot * nm;
        normalise_tables_.emplace_back(entries, std::uint32_t(block_threads) * muon_vector_width<Prec, gemm_t> * 4,
                                       "muon normalise");
      } else {
        normalise_tables_.emplace_back();  // the batch table serves
      }
    }
    chunk_partial_ = device_buffer<double>(most_chunks, "Newton-Schulz norm partials");
  }

  // One entry per run of held aux tensors (the whole group on one GPU or at stage 0).
  void build_aux_tables() {
    for (int ns = 2; ns <= 3; ++ns) {
      std::vector<aux_entry_type> entries;
      std::uint64_t elements = 0;
      for (std::size_t g = 0; g < aux_.size(); ++g) {
        if (adamw::num_states(aux_[g].hparams) != ns) continue;
        for_each_run(
            muon_part::aux, g, [](const tensor_info& it) { return it.held; },
            [&](const tensor_info& it, std::size_t n) {
              aux_entry_type e{};
              e.param = params_of(it);
              e.master = master_of(it);
              e.grad = step_grads(it);
              bool aligned = is_aligned(e.master, vector_bytes) && is_aligned(e.grad, vector_bytes) &&
                             (!Prec::separate_master || is_aligned(e.param, vector_bytes));
              for (int j = 0; j < ns; ++j) {
                e.states[j] = state_of(it, j);
                aligned = aligned && is_aligned(e.states[j], vector_bytes);
              }
              e.n = n;
              e.group = std::uint32_t(g);  // also the Philox tag: the host's aux tag is the aux group's index
              e.first_index = it.offset;   // element i of the run is the group's element offset + i
              e.compensation = compensation_of(it);
              aligned = aligned && is_aligned(e.compensation, vector_bytes);
              e.vector_ok = aligned ? 1u : 0u;
              entries.push_back(e);
              elements += n;
            });
      }
      if (elements == 0) continue;
      dispatch_state_count<2, 3>(ns, [&](auto nsc) {
        const std::uint64_t resident =
            resident_blocks(update_kernel<adamw, Prec, decltype(nsc)::value, adamw::max_states>, "aux update");
        aux_part part;
        part.num_states = ns;
        part.table = device_table<aux_entry_type>(entries, std::uint32_t(block_threads) * update_vector_width<Prec>,
                                                  "aux update");
        part.grid = grid_for(resident, part.table.map().total_chunks);
        aux_parts_.push_back(std::move(part));
      });
    }
  }

  // Statistics over the grads of the held tensors, one entry per run. Sharded, every rank's partials have a place
  // in an all-gathered array: the grid is the same on every rank (the most chunks any rank has).
  void build_stats_table() {
    std::vector<grad_entry<grad_t>> grads;
    const int ranks = sharded() ? world_ : 1;
    std::uint64_t most = 0;
    for (int q = 0; q < ranks; ++q) {
      std::uint64_t chunks = 0;
      auto keep = [&](const tensor_info& it) { return sharded() ? it.owner == q : it.held; };
      for (muon_part part : {muon_part::matrices, muon_part::aux}) {
        const std::size_t groups = part == muon_part::matrices ? matrices_.size() : aux_.size();
        for (std::size_t g = 0; g < groups; ++g)
          for_each_run(part, g, keep, [&](const tensor_info& it, std::size_t n) {
            chunks += (n + stats_chunk_elems<grad_t> - 1) / stats_chunk_elems<grad_t>;
            if (q == rank_ || !sharded())
              grads.push_back({step_grads(it), n, is_aligned(step_grads(it), vector_bytes) ? 1u : 0u});
          });
      }
      most = std::max(most, chunks);
    }
    stats_ = device_table<grad_entry<grad_t>>(grads, stats_chunk_elems<grad_t>, "statistics");
    stats_grid_ = stats_grid(most);
    partial_sum_ = device_buffer<double>(std::size_t(stats_grid_) * std::size_t(ranks), "statistics partial sums");
    partial_flag_ = device_buffer<int>(std::size_t(stats_grid_) * std::size_t(ranks), "statistics partial flags");
  }

  // The collectives' workspace: stage 0's group-wise mean, or the owner-ordered exchange (stages 1-2) and stage 2's
  // reduce_grads.
  void allocate_exchange() {
    if (comm_ == nullptr) return;
    std::size_t total = 0, largest = 0;
    for (const matrix_group_type& m : matrices_) largest = std::max(largest, m.size());
    for (const aux_group_type& a : aux_) largest = std::max(largest, a.size);
    for (const tensor_info& it : layout_.tensors) total += it.size;
    if (zero_.stage == 0 && world_ > 1) mean_ = detail::grad_mean<reduce_type>(*comm_, largest, zero_.bucket_elements);
    const std::size_t n = std::min(std::max<std::size_t>(total, 1), zero_.bucket_elements);
    if (sharded() || zero_.stage >= 2) {
      send_ = device_buffer<reduce_type>(n, "grad exchange send buffer");
      recv_ = device_buffer<reduce_type>(n, "grad exchange receive buffer");
    }
    if (sharded()) param_stage_ = device_buffer<param_t>(n, "param exchange buffer");
    counts_.assign(std::size_t(world_), 0);
  }

  // The mean of every tensor's grads into the reduced grads its holders read: stage 0 group by group (the means
  // all-gathered, so every replica holds the same bits), stages 1-2 to the owners through the owner-ordered layout,
  // one rank (stage 2) a copy.
  void exchange_grads(cudaStream_t stream) {
    for (std::size_t g = 0; g < matrices_.size(); ++g)
      if (matrices_[g].grads == nullptr && matrices_[g].size() > 0)
        throw mpopt::detail::muon_missing_grads(muon_part::matrices, g);
    for (std::size_t g = 0; g < aux_.size(); ++g)
      if (aux_[g].grads == nullptr && aux_[g].size > 0) throw mpopt::detail::muon_missing_grads(muon_part::aux, g);
    if (world_ == 1) {
      if (!uses_reduced()) return;  // the step reads the caller's grads
      for (const tensor_info& it : layout_.tensors)
        if (it.size > 0)
          note(cudaMemcpyAsync(reduced_of(it), caller_grads(it), it.size * sizeof(grad_t), cudaMemcpyDeviceToDevice,
                               stream),
               "step: cudaMemcpyAsync (grads)");
      return;
    }
    if (zero_.stage == 0) {
      auto reduce = [&](const grad_t* grads, std::size_t n, grad_t* out) {
        mean_.reduce(zero::make_partition(n, world_), zero::range{0, n}, grads, out, 0, /*accumulate=*/false,
                     /*gather_means=*/true, last_error_, stream);
      };
      for (std::size_t g = 0; g < matrices_.size(); ++g)
        reduce(matrices_[g].grads, matrices_[g].size(), matrix_storage_[g].reduced.get());
      for (std::size_t g = 0; g < aux_.size(); ++g) reduce(aux_[g].grads, aux_[g].size, aux_storage_[g].reduced.get());
      return;
    }
    const std::size_t mine = layout_.exchange_begin[std::size_t(rank_)];
    layout_.for_each_piece(zero_.bucket_elements, counts_, [&](zero::range piece) {
      layout_.for_each_overlap(piece, [&](const tensor_info& it, std::size_t first, std::size_t count, std::size_t at) {
        note(launch_convert(send_.get() + at, caller_grads(it) + first, count, stream),
             "step: launch of the grad widening kernel");
      });
      comm_->reduce_scatter(send_.get(), recv_.get(), counts_, comm::reduce_op::sum);
      const std::size_t my_first = std::max(piece.begin, mine);  // recv_[0] is layout element my_first
      layout_.for_each_overlap(piece, [&](const tensor_info& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner != rank_) return;
        note(launch_store_mean(reduced_of(it) + first, recv_.get() + (piece.begin + at - my_first), count,
                               reduce_type(world_), false, stream),
             "step: launch of the grad averaging kernel");
      });
    });
  }

  // Stage 2: one tensor's grads, mean over ranks, added to its owner's reduced grads.
  template <class G>
  void reduce_to_owner(const tensor_info& it, const G* g, cudaStream_t stream) {
    auto keep = [this](cudaError_t e, const char* what) { detail::keep_first_error(pending_error_, e, what); };
    for (std::size_t b = 0; b < it.size; b += zero_.bucket_elements) {
      const std::size_t n = std::min(zero_.bucket_elements, it.size - b);
      keep(launch_convert(send_.get(), g + b, n, stream), "reduce_grads: launch of the grad widening kernel");
      const reduce_type* sum = send_.get();
      if (world_ > 1) {
        std::fill(counts_.begin(), counts_.end(), std::size_t(0));
        counts_[std::size_t(it.owner)] = n;
        comm_->reduce_scatter(send_.get(), recv_.get(), counts_, comm::reduce_op::sum);
        if (it.owner != rank_) continue;
        sum = recv_.get();
      }
      keep(launch_store_mean(reduced_of(it) + b, sum, n, reduce_type(world_), true, stream),
           "reduce_grads: launch of the grad averaging kernel");
    }
  }

  // Stages 1-2: every owner's params into every rank's params, through the owner-ordered layout.
  void publish_params(cudaStream_t stream) {
    layout_.for_each_piece(zero_.bucket_elements, counts_, [&](zero::range piece) {
      layout_.for_each_overlap(piece, [&](const tensor_info& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner != rank_) return;
        note(cudaMemcpyAsync(param_stage_.get() + at, params_of(it) + first, count * sizeof(param_t),
                             cudaMemcpyDeviceToDevice, stream),
             "step: cudaMemcpyAsync (params to the exchange buffer)");
      });
      comm_->all_gather(param_stage_.get(), counts_);
      layout_.for_each_overlap(piece, [&](const tensor_info& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner == rank_) return;
        note(cudaMemcpyAsync(params_of(it) + first, param_stage_.get() + at, count * sizeof(param_t),
                             cudaMemcpyDeviceToDevice, stream),
             "step: cudaMemcpyAsync (params from the exchange buffer)");
      });
    });
  }

  // One batched cuBLAS GEMM: C = alpha·op(A)·op(B) + beta·C over `count` matrices.
  void gemm(cublasOperation_t ta, cublasOperation_t tb, std::size_t m, std::size_t n, std::size_t k, float alpha,
            const gemm_t* a, std::size_t lda, std::size_t stride_a, const gemm_t* b, std::size_t ldb,
            std::size_t stride_b, float beta, gemm_t* c, std::size_t ldc, std::size_t stride_c, std::size_t count) {
    constexpr cudaDataType_t type = cublas_type_v<gemm_t>;
    note_cublas(
        cublasGemmStridedBatchedEx(blas_.get(), ta, tb, int(m), int(n), int(k), &alpha, a, type, int(lda),
                                   (long long)stride_a, b, type, int(ldb), (long long)stride_b, &beta, c, type,
                                   int(ldc), (long long)stride_c, int(count), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx (Newton-Schulz)");
  }

  void run_batch(const batch& b, const step_core* core, cudaStream_t stream) {
    const std::size_t k = std::size_t(&b - batches_.data());
    const chunk_map& map = b.table.map();
    muon_momentum_kernel<Prec, gemm_t>
        <<<b.grid, block_threads, 0, stream>>>(b.table.entries(), map, coeffs_d_.get(), core, chunk_partial_.get());
    note(cudaGetLastError(), "step: launch of the muon momentum kernel");
    muon_norm_kernel<Prec, gemm_t><<<std::uint32_t(map.num_entries), block_threads, 0, stream>>>(
        b.table.entries(), map, coeffs_d_.get(), core, chunk_partial_.get(), denom_.get());
    note(cudaGetLastError(), "step: launch of the muon norm kernel");
    const device_table<entry_type>& norm_table = normalise_tables_[k].empty() ? b.table : normalise_tables_[k];
    muon_normalise_kernel<Prec, gemm_t>
        <<<b.grid, block_threads, 0, stream>>>(norm_table.entries(), norm_table.map(), core, denom_.get());
    note(cudaGetLastError(), "step: launch of the muon normalise kernel");

    const std::size_t n = std::min(b.rows, b.cols), m = std::max(b.rows, b.cols), nm = n * m, nn = n * n;
    const bool tall = b.rows > b.cols;
    gemm_t* x = x_[0].get();
    gemm_t* next = x_[1].get();
    gemm_t* gram = gram_.get();
    gemm_t* poly = poly_.get();
    for (int s = 0; s < b.ns_steps; ++s) {
      if (tall) {  // X (n x m, ld n) as stored: A = X·Xᵀ
        gemm(CUBLAS_OP_N, CUBLAS_OP_T, n, n, m, 1.0f, x, n, nm, x, n, nm, 0.0f, gram, n, nn, b.count);
      } else {  // Y = Xᵀ (m x n, ld m) as stored: A = Yᵀ·Y
        gemm(CUBLAS_OP_T, CUBLAS_OP_N, n, n, m, 1.0f, x, m, nm, x, m, nm, 0.0f, gram, n, nn, b.count);
      }
      note(cudaMemcpyAsync(poly, gram, b.count * nn * sizeof(gemm_t), cudaMemcpyDeviceToDevice, stream),
           "step: cudaMemcpyAsync (Newton-Schulz b·A term)");
      gemm(CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, b.c, gram, n, nn, gram, n, nn, b.b, poly, n, nn, b.count);
      note(cudaMemcpyAsync(next, x, b.count * nm * sizeof(gemm_t), cudaMemcpyDeviceToDevice, stream),
           "step: cudaMemcpyAsync (Newton-Schulz a·X term)");
      if (tall) {  // X' = B·X + a·X
        gemm(CUBLAS_OP_N, CUBLAS_OP_N, n, m, n, 1.0f, poly, n, nn, x, n, nm, b.a, next, n, nm, b.count);
      } else {  // Y' = Y·Bᵀ + a·Y
        gemm(CUBLAS_OP_N, CUBLAS_OP_T, m, n, n, 1.0f, x, m, nm, poly, n, nn, b.a, next, m, nm, b.count);
      }
      std::swap(x, next);
    }
    muon_apply_kernel<Prec, gemm_t>
        <<<b.grid, block_threads, 0, stream>>>(b.table.entries(), map, coeffs_d_.get(), core);
    note(cudaGetLastError(), "step: launch of the muon update kernel");
  }

  comm::communicator* comm_ = nullptr;  // ZeRO's; null: one GPU
  zero_options zero_{};
  int rank_ = 0, world_ = 1;
  scaler_args scaler_args_;
  step_options options_;
  std::vector<matrix_group_type> matrices_;
  std::vector<aux_group_type> aux_;
  status last_error_;
  status pending_error_;  // reduce_grads' launch failures, reported by the step that consumes them
  cublas_handle blas_ = make_cublas_handle();

  mpopt::detail::muon_layout<tensor_info> layout_;
  std::vector<storage> matrix_storage_, aux_storage_;
  std::vector<batch> batches_;
  std::vector<device_table<entry_type>> normalise_tables_;  // per batch; empty when the batch table serves
  std::vector<aux_part> aux_parts_;

  device_buffer<muon_matrix_coeffs> coeffs_d_;  // every matrix's, by layout index (matrices come first)
  device_buffer<adamw::args> aux_args_d_;
  device_buffer<adamw::coeffs<compute_t>> aux_coeffs_d_;
  device_buffer<device_options> options_d_;
  device_buffer<scalars_type> scalars_;

  device_table<grad_entry<grad_t>> stats_;
  std::uint32_t stats_grid_ = 0;
  device_buffer<double> partial_sum_;
  device_buffer<int> partial_flag_;

  // The Newton–Schulz workspace, shared by the batches (they run one after the other on the stream).
  device_buffer<gemm_t> x_[2], gram_, poly_;
  device_buffer<float> u_, denom_;
  device_buffer<double> chunk_partial_;

  // The collectives (with a communicator).
  detail::grad_mean<reduce_type> mean_;     // stage 0
  device_buffer<reduce_type> send_, recv_;  // stages 1-2: the owner-ordered exchange; stage 2: reduce_grads
  device_buffer<param_t> param_stage_;      // stages 1-2: the params' all-gather
  std::vector<std::size_t> counts_;         // per-rank counts of one collective
  bool has_reduced_ = false;                // the reduced grads hold what no step has consumed
};

}  // namespace mpopt::cuda
