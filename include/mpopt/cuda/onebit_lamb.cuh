// The kernels of 1-bit LAMB on the GPU (cuda::onebit::optimizer<onebit_lamb, ...>, cuda/onebit.cuh), each the device
// form of a loop of mpopt::onebit::optimizer's: the per-element bodies are onebit/elements.hpp's and the per-tensor
// bookkeeping is onebit_lamb's (rule/onebit.hpp), so both backends round alike. The work is cut into segments, pieces
// of one tensor of at most per_tensor_segment_elems elements (zero::grid_segments, as the exact LAMB's): a block takes
// a segment and writes its sums, and a per-tensor kernel adds a tensor's segment sums in group order. Those sums are
// double, so their order (a block reduction here, element order on the host) moves only their last bits.
//
// Every kernel reads the step's `applied` flag and does nothing on a skipped step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "../numeric/convert.hpp"
#include "../onebit/elements.hpp"
#include "../rule/onebit.hpp"
#include "launch.cuh"
#include "scalars.cuh"
#include "update.cuh"

namespace mpopt::cuda::onebit::detail {

// One segment of the compressed step; every pointer is at the segment's first element.
template <class Prec>
struct lamb_segment {
  typename Prec::master_t* master;
  typename Prec::param_t* param;  // == master when the policy has no separate master
  typename Prec::state_t* m;      // exp_avg
  const typename Prec::state_t* v;
  typename Prec::state_t* fresh;  // exp_avg_sq_fresh
  const typename Prec::grad_t* grad;
  const std::uint8_t* mask;  // null: every element kept
  float* fused;              // the momentum of every group, fused for one compressed allreduce
  float* prev;               // the momentum before the step
  std::uint64_t n;
  std::uint32_t group, tensor;
};

// Which loop of the host's compressed step a launch of lamb_segment_kernel runs.
enum class lamb_pass : int {
  momentum_squares,  // equalise_momentum, once: sum of m^2 (skipped once the equalisers are set)
  fused_momentum,    // fused = (momentum advanced by the local grad) * equaliser; prev = momentum
  moments,           // after the allreduce: momentum and fresh variance stored; sums of u0^2 and u^2, max ratio
  apply,             // the weight step with the tensor's coefficient
};

// Doubles each segment writes: the pass's sums (momentum_squares: the first only).
inline constexpr int lamb_partials = 3;

struct fmax_op {
  MPOPT_DEVICE double operator()(double a, double b) const { return ::fmax(a, b); }
};

// Block b takes segments b, b + gridDim.x, ...
template <lamb_pass P, class Prec>
__global__ void __launch_bounds__(block_threads)
    lamb_segment_kernel(const lamb_segment<Prec>* segs, std::uint64_t count,
                        const lamb::coeffs<typename Prec::compute_t>* coeffs, const step_core* core,
                        const onebit_lamb::tensor_state* tensors, const typename Prec::compute_t* coeff,
                        double* partial) {
  namespace el = mpopt::onebit::element;
  using C = typename Prec::compute_t;
  if (!core->applied) return;
  if constexpr (P == lamb_pass::momentum_squares) {
    if (tensors[0].scaling_coeff != 0.0) return;  // equalised at an earlier compressed step (or restored)
  }
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  const C factor = C(core->grad_factor);
  for (std::uint64_t s = blockIdx.x; s < count; s += gridDim.x) {
    const lamb_segment<Prec> seg = segs[s];
    const lamb::coeffs<C> k = coeffs[seg.group];
    const C scale = C(tensors[seg.tensor].scaling_coeff);
    double a = 0.0, b = 0.0, c = 0.0;
    for (std::uint64_t i = threadIdx.x; i < seg.n; i += block_threads) {
      if constexpr (P == lamb_pass::momentum_squares) {
        const double m = double(convert<C>(seg.m[i]));
        a += m * m;
      } else if constexpr (P == lamb_pass::fused_momentum) {
        const C m_old = convert<C>(seg.m[i]);
        seg.prev[i] = m_old;
        seg.fused[i] = el::lamb_fused_momentum<Prec>(k, m_old, seg.grad[i], factor, scale);
      } else if constexpr (P == lamb_pass::moments) {
        const bool kept = seg.mask == nullptr || seg.mask[i] != 0;
        const el::lamb_terms<C> e = el::lamb_moments<Prec>(k, seg.master[i], seg.m[i], seg.v[i], seg.fresh[i],
                                                           C(kept ? seg.fused[i] / scale : 0.0f), C(seg.prev[i]));
        a += double(e.u0) * double(e.u0);
        b += double(e.u) * double(e.u);
        c = ::fmax(c, double(e.ratio));  // as std::max on the host: a NaN ratio is passed over
      } else {
        el::lamb_apply<Prec>(k, seg.master[i], seg.param[i], seg.m[i], seg.v[i], coeff[seg.tensor]);
      }
    }
    if constexpr (P == lamb_pass::momentum_squares || P == lamb_pass::moments) {
      a = reduce(temp).Sum(a);
      __syncthreads();  // temp is reused
      if constexpr (P == lamb_pass::moments) {
        b = reduce(temp).Sum(b);
        __syncthreads();
        c = reduce(temp).Reduce(c, fmax_op{});
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        partial[lamb_partials * s] = a;
        partial[lamb_partials * s + 1] = b;
        partial[lamb_partials * s + 2] = c;
      }
    }
  }
}

// <<<1, block_threads>>>, once (skipped when tensor 0's equaliser is set): the equalisers from the segments' sums of
// m^2, as the host's equalise_momentum (the mean RMS added in tensor order by one thread). rms: tensors doubles.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    lamb_equalise_kernel(tensor_segments segs, const std::uint64_t* elements, const step_core* core,
                         const double* partial, double* rms, onebit_lamb::tensor_state* tensors) {
  if (!core->applied || tensors[0].scaling_coeff != 0.0) return;
  for (std::uint32_t t = threadIdx.x; t < segs.tensors; t += block_threads) {
    double sq = 0.0;
    for (std::uint64_t k = segs.begin[t]; k < segs.begin[t + 1]; ++k) sq += partial[lamb_partials * segs.slot[k]];
    rms[t] = elements[t] > 0 ? ::sqrt(sq / double(elements[t])) : 0.0;
  }
  __shared__ double united;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    std::uint64_t nonempty = 0;
    for (std::uint32_t t = 0; t < segs.tensors; ++t) {
      sum += rms[t];  // empty tensors add 0 and are not counted
      if (elements[t] > 0) ++nonempty;
    }
    united = nonempty > 0 ? sum / double(nonempty) : 0.0;
  }
  __syncthreads();
  for (std::uint32_t t = threadIdx.x; t < segs.tensors; t += block_threads)
    tensors[t].scaling_coeff = onebit_lamb::equaliser(rms[t], united);
}

// Warm-up: each tensor's trust ratio of this step joins its EMA.
template <class C>
__global__ void __launch_bounds__(block_threads)
    lamb_warmup_ratio_kernel(tensor_segments segs, const onebit_lamb::args* args, const step_core* core, const C* ratio,
                             onebit_lamb::tensor_state* tensors) {
  if (!core->applied) return;
  for (std::uint32_t t = blockIdx.x * block_threads + threadIdx.x; t < segs.tensors; t += gridDim.x * block_threads)
    onebit_lamb::record_warmup_ratio(args[segs.group[t]], tensors[t], double(ratio[t]));
}

// Compressed step: block b takes tensors b, b + gridDim.x, ...: adds the tensor's segment sums, bounds its factor and
// writes its coefficient (in the compute type) to coeff[t].
template <class C>
__global__ void __launch_bounds__(block_threads)
    lamb_factor_kernel(tensor_segments segs, const onebit_lamb::args* args, const step_core* core,
                       const double* partial, onebit_lamb::tensor_state* tensors, C* coeff) {
  if (!core->applied) return;
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  for (std::uint32_t t = blockIdx.x; t < segs.tensors; t += gridDim.x) {
    double u0 = 0.0, u = 0.0, max_ratio = 0.0;
    for (std::uint64_t k = segs.begin[t] + threadIdx.x; k < segs.begin[t + 1]; k += block_threads) {
      const double* p = partial + lamb_partials * segs.slot[k];
      u0 += p[0];
      u += p[1];
      max_ratio = ::fmax(max_ratio, p[2]);
    }
    u0 = reduce(temp).Sum(u0);
    __syncthreads();
    u = reduce(temp).Sum(u);
    __syncthreads();
    max_ratio = reduce(temp).Reduce(max_ratio, fmax_op{});
    __syncthreads();
    if (threadIdx.x == 0) {
      onebit_lamb::tensor_state& ts = tensors[t];
      onebit_lamb::record_compressed_factor(args[segs.group[t]], ts, max_ratio, ::sqrt(u0), ::sqrt(u));
      coeff[t] = C(ts.last_coeff);
    }
  }
}

}  // namespace mpopt::cuda::onebit::detail
