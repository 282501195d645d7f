// mpopt::cuda::muon_optimizer: mpopt::muon_optimizer (mpopt/muon.hpp) on the CUDA backend, one rank. The
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
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <cub/block/block_reduce.cuh>

#include "../config.hpp"
#include "../error.hpp"
#include "../muon.hpp"
#include "../numeric/convert.hpp"
#include "../optimizer.hpp"
#include "../policy/precision.hpp"
#include "../policy/rounding.hpp"
#include "../rule/adam.hpp"
#include "../rule/muon.hpp"
#include "../scaler/scalers.hpp"
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

// An owning cuBLAS handle.
class cublas_handle {
 public:
  cublas_handle() {
    const cublasStatus_t s = cublasCreate(&handle_);
    if (s != CUBLAS_STATUS_SUCCESS) throw error(to_status(s, "cublasCreate"));
  }
  cublas_handle(const cublas_handle&) = delete;
  cublas_handle& operator=(const cublas_handle&) = delete;
  cublas_handle(cublas_handle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  cublas_handle& operator=(cublas_handle&& o) noexcept {
    if (this != &o) {
      release();
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }
  ~cublas_handle() { release(); }
  cublasHandle_t get() const noexcept { return handle_; }

 private:
  void release() noexcept {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
    handle_ = nullptr;
  }
  cublasHandle_t handle_ = nullptr;
};

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

  // Device pointers in the groups. Validates as the host optimizer does (same messages) plus alignment of params and
  // grads to their element size; allocates the masters, states, a kahan_summation master's compensation and the
  // Newton–Schulz workspace (sized for the largest batch) on the current device, initialises them on `stream` (the
  // compensation to 0) and waits for that: construction is the one place that synchronises. Throws mpopt::error.
  explicit muon_optimizer(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux = {},
                          scaler_args scaler = {}, step_options options = {}, cudaStream_t stream = nullptr)
      : scaler_args_(scaler), options_(options) {
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(mpopt::detail::validate_step_options(options_));
    for (std::size_t g = 0; g < matrices.size(); ++g) {
      throw_if_error(mpopt::detail::validate_muon_group(matrices[g], g));
      throw_if_error(check_alignment(matrices[g].params, "matrix", g));
      throw_if_error(check_alignment(matrices[g].grads, "matrix", g));
    }
    for (std::size_t g = 0; g < aux.size(); ++g) {
      throw_if_error(mpopt::detail::validate_aux_group(aux[g], g));
      throw_if_error(check_alignment(aux[g].params, "aux", g));
      throw_if_error(check_alignment(aux[g].grads, "aux", g));
    }
    matrices_ = std::move(matrices);
    aux_ = std::move(aux);
    allocate_states(stream);
    build_batches(stream);
    build_aux_tables();
    build_stats_table();

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

  muon_optimizer(const muon_optimizer&) = delete;
  muon_optimizer& operator=(const muon_optimizer&) = delete;
  muon_optimizer(muon_optimizer&&) noexcept = default;
  muon_optimizer& operator=(muon_optimizer&&) noexcept = default;
  ~muon_optimizer() = default;

  // Enqueues one whole step on `stream` without synchronising. A launch or cuBLAS failure is kept in last_error().
  void step(cudaStream_t stream) {
    last_error_ = enqueue_step_scalars<adamw, Scaler, compute_t>(
        stats_, stats_grid_, partial_sum_.get(), partial_flag_.get(), scaler_args_, options_d_.get(), scalars_.get(),
        aux_args_d_.get(), aux_coeffs_d_.get(), std::uint32_t(aux_.size()), stream);
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
  }

  const status& last_error() const noexcept { return last_error_; }

  // The outcome of the latest step() on `stream`: copies the step scalars back and waits for the stream.
  step_result result(cudaStream_t stream) const { return read_step_result(scalars_.get(), last_error_, stream); }

  std::size_t num_matrix_groups() const noexcept { return matrices_.size(); }
  std::size_t num_aux_groups() const noexcept { return aux_.size(); }
  const muon::args& matrix_hparams(std::size_t g) const { return matrices_.at(g).hparams; }
  const adamw::args& aux_hparams(std::size_t g) const { return aux_.at(g).hparams; }

  // Validated first (the host's messages), then written on `stream`.
  void set_matrix_hparams(std::size_t g, const muon::args& a, cudaStream_t stream) {
    check_group(muon_part::matrices, g);
    status s = muon::validate(a);
    if (!s.ok()) s.message = "matrix group " + std::to_string(g) + ": " + s.message;
    throw_if_error(s);
    const muon::args& old = matrices_[g].hparams;
    if (a.ns_steps != old.ns_steps || a.ns_coefficients.a != old.ns_coefficients.a ||
        a.ns_coefficients.b != old.ns_coefficients.b || a.ns_coefficients.c != old.ns_coefficients.c)
      throw error(status{errc::unsupported, "matrix group " + std::to_string(g) +
                                                ": ns_steps and ns_coefficients fix the GEMM batches and cannot "
                                                "change after construction on the CUDA backend"});
    for (std::size_t i = matrix_first_[g]; i < matrix_first_[g + 1]; ++i) {
      store_value_kernel<muon_matrix_coeffs>
          <<<1, 1, 0, stream>>>(coeffs_d_.get() + i, make_muon_coeffs(a, shapes_[i].rows, shapes_[i].cols));
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

  // Device pointers of group g's flat buffers: its master (the param buffer itself when the policy has no separate
  // master) and state j (matrices: 0, the momentum buffer; aux: AdamW's states).
  master_t* master(muon_part part, std::size_t g) const {
    check_group(part, g);
    const storage& s = part == muon_part::matrices ? matrix_storage_[g] : aux_storage_[g];
    if constexpr (Prec::separate_master) {
      return s.master.get();
    } else {
      return part == muon_part::matrices ? matrices_[g].params : aux_[g].params;
    }
  }
  state_t* state(muon_part part, std::size_t g, int j) const {
    check_group(part, g);
    const storage& s = part == muon_part::matrices ? matrix_storage_[g] : aux_storage_[g];
    if (j < 0 || std::size_t(j) >= s.states.size())
      throw error(status::invalid("state index " + std::to_string(j) + " out of range for " +
                                  (part == muon_part::matrices ? std::string("matrix") : std::string("aux")) +
                                  " group " + std::to_string(g) + " (" + std::to_string(s.states.size()) + " states)"));
    return s.states[std::size_t(j)].get();
  }
  // kahan_summation: group g's compensation (what rounding dropped from each master element; the group's size, device
  // memory); null with another master rounding. The host optimizer's compensation(part, g, t) is tensor t of it.
  master_t* compensation(muon_part part, std::size_t g) const {
    check_group(part, g);
    return (part == muon_part::matrices ? matrix_storage_[g] : aux_storage_[g]).compensation.get();
  }

  // Multiply-adds of the Newton–Schulz GEMMs per applied step (for throughput figures).
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

  struct storage {
    device_buffer<master_t> master;        // empty when the param buffer is the master
    device_buffer<master_t> compensation;  // kahan_summation only: what rounding dropped, per element
    std::vector<device_buffer<state_t>> states;
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

  void check_group(muon_part part, std::size_t g) const {
    const std::size_t count = part == muon_part::matrices ? matrices_.size() : aux_.size();
    if (g >= count)
      throw error(status::invalid(std::string(part == muon_part::matrices ? "matrix" : "aux") + " group index " +
                                  std::to_string(g) + " out of range (" + std::to_string(count) + " groups)"));
  }

  void note(cudaError_t err, const char* what) { detail::keep_first_error(last_error_, err, what); }
  void note_cublas(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS && last_error_.ok()) last_error_ = to_status(s, what);
  }

  storage make_storage(param_t* params, std::size_t n, int num_states, const std::string& where, cudaStream_t stream) {
    storage s;
    if constexpr (Prec::separate_master)
      s.master = converted_buffer<master_t>(n, params, n, "master of " + where, stream);
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
      s.compensation = filled_buffer<master_t>(n, master_t{}, "compensation of " + where, stream);
    for (int j = 0; j < num_states; ++j)
      s.states.push_back(
          filled_buffer<state_t>(n, state_t(0.0f), "state " + std::to_string(j) + " of " + where, stream));
    return s;
  }

  void allocate_states(cudaStream_t stream) {
    for (std::size_t g = 0; g < matrices_.size(); ++g)
      matrix_storage_.push_back(
          make_storage(matrices_[g].params, matrices_[g].size(), 1, "matrix group " + std::to_string(g), stream));
    for (std::size_t g = 0; g < aux_.size(); ++g)
      aux_storage_.push_back(make_storage(aux_[g].params, aux_[g].size, adamw::num_states(aux_[g].hparams),
                                          "aux group " + std::to_string(g), stream));
  }

  // Batches by (shape, NS parameters), in order of first appearance; the workspace is sized for the largest.
  void build_batches(cudaStream_t stream) {
    struct member {
      std::size_t group, offset, index;
    };
    std::vector<std::vector<member>> members;
    std::vector<muon_matrix_coeffs> coeffs;
    matrix_first_.push_back(0);
    for (std::size_t g = 0; g < matrices_.size(); ++g) {
      const muon::args& hp = matrices_[g].hparams;
      std::size_t offset = 0;
      for (const matrix_shape& s : matrices_[g].shapes) {
        const std::size_t index = shapes_.size();
        shapes_.push_back(s);
        coeffs.push_back(make_muon_coeffs(hp, s.rows, s.cols));
        std::size_t k = 0;
        for (; k < batches_.size(); ++k) {
          const batch& b = batches_[k];
          if (b.rows == s.rows && b.cols == s.cols && b.ns_steps == hp.ns_steps && b.a == float(hp.ns_coefficients.a) &&
              b.b == float(hp.ns_coefficients.b) && b.c == float(hp.ns_coefficients.c))
            break;
        }
        if (k == batches_.size()) {
          batch b;
          b.rows = s.rows;
          b.cols = s.cols;
          b.ns_steps = hp.ns_steps;
          b.a = float(hp.ns_coefficients.a);
          b.b = float(hp.ns_coefficients.b);
          b.c = float(hp.ns_coefficients.c);
          batches_.push_back(std::move(b));
          members.emplace_back();
        }
        ++batches_[k].count;
        members[k].push_back({g, offset, index});
        offset += s.rows * s.cols;
      }
      matrix_first_.push_back(shapes_.size());
    }
    if (!coeffs.empty()) {
      coeffs_d_ = device_buffer<muon_matrix_coeffs>(coeffs.size(), "muon coefficients");
      throw_if_cuda_error(cudaMemcpy(coeffs_d_.get(), coeffs.data(), coeffs_d_.bytes(), cudaMemcpyHostToDevice),
                          "cudaMemcpy(muon coefficients)");
    }
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
        const member& mb = members[k][slot];
        entry_type e{};
        e.grad = matrices_[mb.group].grads + mb.offset;
        e.momentum = matrix_storage_[mb.group].states[0].get() + mb.offset;
        e.param = matrices_[mb.group].params + mb.offset;
        e.master = master(muon_part::matrices, mb.group) + mb.offset;
        e.u = u_.get() + slot * nm;
        e.x = result + slot * nm;
        e.n = nm;
        e.matrix = std::uint32_t(mb.index);
        e.first_index = mb.offset;
        e.rounding_tag = std::uint32_t(muon_rounding_tag(muon_part::matrices, mb.group));
        if (master_t* c = compensation(muon_part::matrices, mb.group)) e.compensation = c + mb.offset;
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

  void build_aux_tables() {
    for (int ns = 2; ns <= 3; ++ns) {
      std::vector<aux_entry_type> entries;
      std::uint64_t elements = 0;
      for (std::size_t g = 0; g < aux_.size(); ++g) {
        if (adamw::num_states(aux_[g].hparams) != ns || aux_[g].size == 0) continue;
        aux_entry_type e{};
        e.param = aux_[g].params;
        e.master = master(muon_part::aux, g);
        e.grad = aux_[g].grads;
        bool aligned = is_aligned(e.master, vector_bytes) && is_aligned(e.grad, vector_bytes) &&
                       (!Prec::separate_master || is_aligned(e.param, vector_bytes));
        for (int j = 0; j < ns; ++j) {
          e.states[j] = aux_storage_[g].states[std::size_t(j)].get();
          aligned = aligned && is_aligned(e.states[j], vector_bytes);
        }
        e.n = aux_[g].size;
        e.group = std::uint32_t(g);  // also the Philox tag: the host's aux tag is the aux group's index
        e.first_index = 0;           // one entry per group: element i is the group's element i
        e.compensation = compensation(muon_part::aux, g);
        aligned = aligned && is_aligned(e.compensation, vector_bytes);
        e.vector_ok = aligned ? 1u : 0u;
        entries.push_back(e);
        elements += aux_[g].size;
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

  void build_stats_table() {
    std::vector<grad_entry<grad_t>> grads;
    for (const matrix_group_type& m : matrices_)
      grads.push_back({m.grads, m.size(), is_aligned(m.grads, vector_bytes) ? 1u : 0u});
    for (const aux_group_type& a : aux_)
      grads.push_back({a.grads, a.size, is_aligned(a.grads, vector_bytes) ? 1u : 0u});
    stats_ = device_table<grad_entry<grad_t>>(grads, stats_chunk_elems<grad_t>, "statistics");
    stats_grid_ = stats_grid(stats_.map().total_chunks);
    partial_sum_ = device_buffer<double>(stats_grid_, "statistics partial sums");
    partial_flag_ = device_buffer<int>(stats_grid_, "statistics partial flags");
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

  std::vector<matrix_group_type> matrices_;
  std::vector<aux_group_type> aux_;
  scaler_args scaler_args_;
  step_options options_;
  status last_error_;
  cublas_handle blas_;

  std::vector<storage> matrix_storage_, aux_storage_;
  std::vector<matrix_shape> shapes_;       // every matrix, group by group
  std::vector<std::size_t> matrix_first_;  // per matrix group: its first matrix index, and the end
  std::vector<batch> batches_;
  std::vector<device_table<entry_type>> normalise_tables_;  // per batch; empty when the batch table serves
  std::vector<aux_part> aux_parts_;

  device_buffer<muon_matrix_coeffs> coeffs_d_;
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
};

}  // namespace mpopt::cuda
