// The fused update: one pass that reads grad, master and states and writes master, states and the low-precision
// param copy, for every elementwise rule and precision policy; LAMB's two phases and per-tensor trust ratios. The
// per-element arithmetic is host::detail::elementwise_range's (and per_tensor_partials' and per_tensor_apply's), step
// for step: the same convert<> calls and the same Rule functions in the same order, and the master stored through the
// same round_master (policy/rounding.hpp) with the same key, step and element index. Only loading, vectorising and
// storing are added.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include <cub/block/block_reduce.cuh>

#include "../config.hpp"
#include "../numeric/accumulate.hpp"
#include "../numeric/convert.hpp"
#include "../policy/rounding.hpp"
#include "../rules.hpp"
#include "../zero/partition.hpp"
#include "launch.cuh"
#include "scalars.cuh"

namespace mpopt::cuda {

// One tensor (or one whole flat group) of the multi-tensor update: the caller's param and grad, the optimizer's
// master (== param when the policy has no separate master) and states[0, NS). The last two fields serve a
// stochastic_rounding or kahan_summation master only (zero otherwise).
template <class Prec, int MaxStates>
struct tensor_entry {
  typename Prec::param_t* param;
  typename Prec::master_t* master;
  const typename Prec::grad_t* grad;
  typename Prec::state_t* states[MaxStates > 0 ? MaxStates : 1];
  std::uint64_t n;
  std::uint32_t group;      // index of the group's coefficients
  std::uint32_t vector_ok;  // every stream this entry touches is 16-byte aligned
  // Index of element 0 within its parameter group, stochastic rounding's counter: the tensor's offset in the group,
  // plus the shard's offset where a rank holds a shard of it.
  std::uint64_t first_index;
  typename Prec::master_t* compensation;  // kahan_summation: the compensation of element 0
};

// The host's master_store_ctx for an entry (mpopt::optimizer::update_group): the group's key under the seed, the
// step counter as this step advanced it, the entry's first index and compensation. Seed and step are read from
// device memory, so a captured step keys each replay with that replay's values.
template <class Prec, int MS>
MPOPT_DEVICE MPOPT_FORCEINLINE master_store_ctx<typename Prec::master_t> master_ctx(const tensor_entry<Prec, MS>& t,
                                                                                    const step_core& core) {
  return make_master_store_ctx(group_rounding_key(core.rounding_seed, t.group), std::uint64_t(core.step), t.first_index,
                               t.compensation);
}

// Elements per thread of the update: 16 bytes of the narrowest of the four roles' types.
template <class Prec>
inline constexpr int update_vector_width =
    elements_per_vector<typename Prec::param_t, typename Prec::master_t, typename Prec::grad_t, typename Prec::state_t>;

// The state counts each rule's num_states(args) can return; one kernel is compiled per count. Rules not listed
// get every count from 0 to max_states.
template <class Rule>
struct state_counts {
  static constexpr int min = 0, max = Rule::max_states;
};
template <>
struct state_counts<adam> {
  static constexpr int min = 2, max = 3;  // amsgrad adds the third
};
template <>
struct state_counts<adamw> : state_counts<adam> {};
template <>
struct state_counts<adagrad> {
  static constexpr int min = 1, max = 1;
};
template <>
struct state_counts<lion> {
  static constexpr int min = 1, max = 1;
};
template <>
struct state_counts<lamb> {
  static constexpr int min = 2, max = 2;
};

// Calls f(std::integral_constant<int, NS>{}) for the runtime ns in [Lo, Hi]; false when ns is outside.
template <int Lo, int Hi, class F>
bool dispatch_state_count(int ns, F&& f) {
  if constexpr (Lo > Hi) {
    (void)ns, (void)f;
    return false;
  } else {
    if (ns == Lo) {
      f(std::integral_constant<int, Lo>{});
      return true;
    }
    return dispatch_state_count<Lo + 1, Hi>(ns, f);
  }
}

namespace detail {

// Whether the master's stores read master_ctx (stochastic_rounding and kahan_summation do).
template <class Prec>
inline constexpr bool needs_master_ctx_v = !std::is_same_v<typename Prec::master_rounding, nearest_rounding>;

// Stores of the master's W elements at i of an entry (tensor_entry, cuda/muon.cuh's muon_entry: anything with a
// `compensation` pointer at its element 0): round_master on each new value w (w_old: the value it replaces) with the
// host's context and index; nearest_rounding is convert<M>(w) and needs no context. Kahan's compensation moves with
// the master's vector width and is updated in registers.
template <class Prec, int W>
struct master_store {
  using C = typename Prec::compute_t;
  using M = typename Prec::master_t;
  static constexpr bool kahan = std::is_same_v<typename Prec::master_rounding, kahan_summation>;
  vec<M, kahan ? W : 1> comp;

  template <class Entry>
  MPOPT_DEVICE MPOPT_FORCEINLINE master_store(const Entry& t, std::uint64_t i) {
    if constexpr (kahan) comp = load<M, W>(t.compensation + i);
  }
  MPOPT_DEVICE MPOPT_FORCEINLINE M round(C w, C w_old, const master_store_ctx<M>& ctx, std::uint64_t i, int e) {
    if constexpr (kahan) {
      master_store_ctx<M> here = ctx;
      here.compensation = comp.v;
      return round_master<kahan_summation>(w, w_old, here, std::uint64_t(e));
    } else {
      return round_master<typename Prec::master_rounding>(w, w_old, ctx, i + std::uint64_t(e));
    }
  }
  template <class Entry>
  MPOPT_DEVICE MPOPT_FORCEINLINE void finish(const Entry& t, std::uint64_t i) const {
    if constexpr (kahan) store<M, W>(t.compensation + i, comp);
  }
};

// host::detail::elementwise_range's body for W consecutive elements at i.
template <class Rule, class Prec, int NS, int MS>
struct update_op {
  using C = typename Prec::compute_t;
  using param_t = typename Prec::param_t;
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;
  static constexpr int S = NS > 0 ? NS : 1;

  tensor_entry<Prec, MS> t;
  typename Rule::template coeffs<C> k;
  C factor;
  master_store_ctx<master_t> ctx;  // master_ctx(t, core); unused (not even set) with nearest_rounding

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) const {
    vec<master_t, W> m = load<master_t, W>(t.master + i);
    const vec<grad_t, W> g = load<grad_t, W>(t.grad + i);
    vec<state_t, W> st[S];
#pragma unroll
    for (int j = 0; j < NS; ++j) st[j] = load<state_t, W>(t.states[j] + i);
    vec<param_t, W> p;
    master_store<Prec, W> rounding(t, i);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      C s[Rule::max_states > 0 ? Rule::max_states : 1] = {};  // rule/common.hpp: max_states slots, zero beyond NS
#pragma unroll
      for (int j = 0; j < NS; ++j) s[j] = convert<C>(st[j].v[e]);
      C w = convert<C>(m.v[e]);
      const C w_old = w;
      const C ge = convert<C>(g.v[e]) * factor;
      Rule::apply(k, w, ge, s);
#pragma unroll
      for (int j = 0; j < NS; ++j) st[j].v[e] = convert<state_t>(s[j]);
      m.v[e] = rounding.round(w, w_old, ctx, i, e);  // rounded once; the param copy is that master, rounded
      if constexpr (Prec::separate_master) p.v[e] = convert<param_t>(m.v[e]);
    }
#pragma unroll
    for (int j = 0; j < NS; ++j) store<state_t, W>(t.states[j] + i, st[j]);
    store<master_t, W>(t.master + i, m);
    rounding.finish(t, i);
    if constexpr (Prec::separate_master) store<param_t, W>(t.param + i, p);
  }
};

template <class Entry>
MPOPT_DEVICE MPOPT_FORCEINLINE void chunk_range(const chunk_map& map, std::uint64_t c, std::uint32_t e, const Entry& t,
                                                std::uint64_t& begin, std::uint64_t& end) {
  begin = (c - map.chunk_begin[e]) * map.chunk_elems;
  end = begin + map.chunk_elems < t.n ? begin + map.chunk_elems : t.n;
}

}  // namespace detail

// The elementwise update of every entry of the table, NS states each. Returns at once when the step is skipped
// (core->applied == 0: found_inf, or the scale at its minimum), so a skipped step writes nothing.
template <class Rule, class Prec, int NS, int MS>
__global__ void __launch_bounds__(block_threads)
    update_kernel(const tensor_entry<Prec, MS>* entries, chunk_map map,
                  const typename Rule::template coeffs<typename Prec::compute_t>* coeffs, const step_core* core) {
  static_assert(!Rule::per_tensor, "update_kernel is for elementwise rules");
  if (!core->applied) return;
  using C = typename Prec::compute_t;
  constexpr int V = update_vector_width<Prec>;
  detail::update_op<Rule, Prec, NS, MS> op;
  op.factor = C(core->grad_factor);
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.k = coeffs[op.t.group];
    if constexpr (detail::needs_master_ctx_v<Prec>) op.ctx = master_ctx(op.t, *core);
    std::uint64_t begin, end;
    detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<V>(begin, end, op.t.vector_ok != 0, op);
  }
}

template <class Rule, class Prec, int NS, int MS>
cudaError_t launch_update(const tensor_entry<Prec, MS>* entries, const chunk_map& map, std::uint32_t grid,
                          const typename Rule::template coeffs<typename Prec::compute_t>* coeffs, const step_core* core,
                          cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  update_kernel<Rule, Prec, NS, MS><<<grid, block_threads, 0, stream>>>(entries, map, coeffs, core);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------------------
// LAMB (Rule::per_tensor): host::per_tensor_partials, trust_ratios and per_tensor_apply, in three launches. Entries
// are segments: pieces of one tensor of at most per_tensor_segment_elems elements, cut at the tensor's ends and at
// multiples of per_tensor_segment_elems in group coordinates (zero::grid_segments). Phase 1 advances and stores the
// states and writes each segment's sums of |w|^2 and |u|^2 (double, as the host); the ratio kernel sums each tensor's
// segment sums in group order and calls Rule::trust_ratio; phase 2 recomputes u from the stored states and applies
// it. ZeRO shards begin at multiples of per_tensor_segment_elems, so every world size and stage cuts the same
// segments and sums them in the same order: with the segment sums of every rank all-gathered between phase 1 and the
// ratio kernel, a sharded step gives the single-rank bits (when the caller's buffers are 16-byte aligned, so each
// segment takes the same vector path everywhere).

inline constexpr std::uint32_t per_tensor_segment_elems = std::uint32_t(zero::shard_alignment);
static_assert(per_tensor_segment_elems % (vector_bytes / 2) == 0,
              "a segment must hold whole vectors of the update's narrowest type");

// Tensor t's segment sums are partial[2 * slot[k]] (|w|^2) and partial[2 * slot[k] + 1] (|u|^2) for k in
// [begin[t], begin[t + 1]), in group order; its coefficients are coeffs[group[t]]. Device memory.
struct tensor_segments {
  const std::uint64_t* begin = nullptr;  // tensors + 1 values
  const std::uint64_t* slot = nullptr;
  const std::uint32_t* group = nullptr;
  std::uint32_t tensors = 0;
};

namespace detail {

template <class Rule, class Prec, int MS>
struct per_tensor_phase1_op {
  using C = typename Prec::compute_t;
  using state_t = typename Prec::state_t;
  static constexpr int NS = Rule::max_states;

  tensor_entry<Prec, MS> t;
  typename Rule::template coeffs<C> k;
  C factor;
  double w_sq = 0.0, u_sq = 0.0;

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) {
    const auto m = load<typename Prec::master_t, W>(t.master + i);
    const auto g = load<typename Prec::grad_t, W>(t.grad + i);
    vec<state_t, W> st[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) st[j] = load<state_t, W>(t.states[j] + i);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      C s[NS];
#pragma unroll
      for (int j = 0; j < NS; ++j) s[j] = convert<C>(st[j].v[e]);
      const C w = convert<C>(m.v[e]);
      Rule::update_states(k, convert<C>(g.v[e]) * factor, s);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        st[j].v[e] = convert<state_t>(s[j]);
        s[j] = convert<C>(st[j].v[e]);  // the direction uses the stored (rounded) states
      }
      const C u = Rule::direction(k, w, s);
      w_sq += double(w) * double(w);
      u_sq += double(u) * double(u);
    }
#pragma unroll
    for (int j = 0; j < NS; ++j) store<state_t, W>(t.states[j] + i, st[j]);
  }
};

template <class Rule, class Prec, int MS>
struct per_tensor_phase2_op {
  using C = typename Prec::compute_t;
  using state_t = typename Prec::state_t;
  using master_t = typename Prec::master_t;
  using param_t = typename Prec::param_t;
  static constexpr int NS = Rule::max_states;

  tensor_entry<Prec, MS> t;
  typename Rule::template coeffs<C> k;
  C ratio;
  master_store_ctx<master_t> ctx;  // as update_op's

  template <int W>
  MPOPT_DEVICE MPOPT_FORCEINLINE void run(std::uint64_t i) const {
    vec<master_t, W> m = load<master_t, W>(t.master + i);
    vec<state_t, W> st[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) st[j] = load<state_t, W>(t.states[j] + i);
    vec<param_t, W> p;
    master_store<Prec, W> rounding(t, i);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      C s[NS];
#pragma unroll
      for (int j = 0; j < NS; ++j) s[j] = convert<C>(st[j].v[e]);
      C w = convert<C>(m.v[e]);
      const C w_old = w;
      Rule::apply_direction(k, w, Rule::direction(k, w, s), ratio);
      m.v[e] = rounding.round(w, w_old, ctx, i, e);
      if constexpr (Prec::separate_master) p.v[e] = convert<param_t>(m.v[e]);
    }
    store<master_t, W>(t.master + i, m);
    rounding.finish(t, i);
    if constexpr (Prec::separate_master) store<param_t, W>(t.param + i, p);
  }
};

}  // namespace detail

template <class Rule, class Prec, int MS>
__global__ void __launch_bounds__(block_threads)
    per_tensor_phase1_kernel(const tensor_entry<Prec, MS>* entries, chunk_map map,
                             const typename Rule::template coeffs<typename Prec::compute_t>* coeffs,
                             const step_core* core, double* partial) {
  static_assert(Rule::per_tensor, "per_tensor kernels are for rules with trust ratios");
  if (!core->applied) return;
  using C = typename Prec::compute_t;
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  detail::per_tensor_phase1_op<Rule, Prec, MS> op;
  op.factor = C(core->grad_factor);
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.k = coeffs[op.t.group];
    op.w_sq = 0.0;
    op.u_sq = 0.0;
    std::uint64_t begin, end;
    detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<update_vector_width<Prec>>(begin, end, op.t.vector_ok != 0, op);
    const double w = reduce(temp).Sum(op.w_sq);
    __syncthreads();  // temp is reused
    const double u = reduce(temp).Sum(op.u_sq);
    __syncthreads();
    if (threadIdx.x == 0) {
      partial[2 * c] = w;
      partial[2 * c + 1] = u;
    }
  }
}

// Block b takes tensors b, b + gridDim.x, ...: sums the tensor's segment sums (thread i: its segments i, i + 256, ...,
// then cub::BlockReduce) and writes ratio[tensor].
template <class Rule, class C>
__global__ void __launch_bounds__(block_threads)
    per_tensor_ratio_kernel(tensor_segments segs, const typename Rule::template coeffs<C>* coeffs,
                            const step_core* core, const double* partial, C* ratio) {
  if (!core->applied) return;
  using reduce = cub::BlockReduce<double, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  for (std::uint32_t t = blockIdx.x; t < segs.tensors; t += gridDim.x) {
    double w = 0.0, u = 0.0;
    for (std::uint64_t k = segs.begin[t] + threadIdx.x; k < segs.begin[t + 1]; k += block_threads) {
      w += partial[2 * segs.slot[k]];
      u += partial[2 * segs.slot[k] + 1];
    }
    w = reduce(temp).Sum(w);
    __syncthreads();
    u = reduce(temp).Sum(u);
    __syncthreads();
    if (threadIdx.x == 0) ratio[t] = Rule::trust_ratio(coeffs[segs.group[t]], ::sqrt(w), ::sqrt(u));
  }
}

template <class Rule, class Prec, int MS>
__global__ void __launch_bounds__(block_threads)
    per_tensor_phase2_kernel(const tensor_entry<Prec, MS>* entries, chunk_map map,
                             const typename Rule::template coeffs<typename Prec::compute_t>* coeffs,
                             const step_core* core, const std::uint32_t* entry_tensor,
                             const typename Prec::compute_t* ratio) {
  if (!core->applied) return;
  detail::per_tensor_phase2_op<Rule, Prec, MS> op;
  for (std::uint64_t c = blockIdx.x; c < map.total_chunks; c += gridDim.x) {
    const std::uint32_t e = find_entry(map, c);
    op.t = entries[e];
    op.k = coeffs[op.t.group];
    op.ratio = ratio[entry_tensor[e]];
    if constexpr (detail::needs_master_ctx_v<Prec>) op.ctx = master_ctx(op.t, *core);
    std::uint64_t begin, end;
    detail::chunk_range(map, c, e, op.t, begin, end);
    for_each_in_chunk<update_vector_width<Prec>>(begin, end, op.t.vector_ok != 0, op);
  }
}

// The three launches of a per-tensor step over this rank's segments (entries, one chunk each: chunk_elems ==
// per_tensor_segment_elems), writing their sums to partial[0, 2 * entries) (a slice of the segment-sum array),
// `between()` (the all-gather of every rank's slice, or nothing on one rank), then the ratios of every tensor
// (entry_tensor[e]: entry e's tensor) and the update. grid == 0 (no local elements) launches neither phase; ratio_grid
// blocks (any count: the sums do not depend on it) compute the ratios.
template <class Rule, class Prec, int MS, class Between>
cudaError_t launch_per_tensor_update(const tensor_entry<Prec, MS>* entries, const chunk_map& map, std::uint32_t grid,
                                     const std::uint32_t* entry_tensor, const tensor_segments& segs,
                                     std::uint32_t ratio_grid,
                                     const typename Rule::template coeffs<typename Prec::compute_t>* coeffs,
                                     const step_core* core, double* partial, const double* all_partials,
                                     typename Prec::compute_t* ratio, cudaStream_t stream, Between&& between) {
  using C = typename Prec::compute_t;
  if (grid > 0)
    per_tensor_phase1_kernel<Rule, Prec, MS><<<grid, block_threads, 0, stream>>>(entries, map, coeffs, core, partial);
  const cudaError_t err = cudaGetLastError();
  between();  // even after a failed launch: every rank joins the collective, or the others wait forever
  if (err != cudaSuccess) return err;
  // The ratios also with no local elements: 1-bit LAMB records every tensor's (an empty tensor's is 1).
  if (ratio_grid > 0) {
    per_tensor_ratio_kernel<Rule, C><<<ratio_grid, block_threads, 0, stream>>>(segs, coeffs, core, all_partials, ratio);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;  // no update with stale ratios
  }
  if (grid > 0)
    per_tensor_phase2_kernel<Rule, Prec, MS>
        <<<grid, block_threads, 0, stream>>>(entries, map, coeffs, core, entry_tensor, ratio);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------------------
// Elementwise kernels over one flat buffer: initialisation at construction, and ZeRO's grad reduction around the
// collectives (cuda/optimizer.cuh), which does on the device what mpopt::optimizer::reduce_range does on the host.

// Blocks of a grid-stride elementwise launch over n elements: one element per thread, at most 4096 blocks.
inline std::uint32_t elementwise_grid(std::uint64_t n) {
  const std::uint64_t blocks = (n + block_threads - 1) / block_threads;
  return std::uint32_t(blocks < 4096 ? blocks : 4096);
}

template <class To, class From>
__global__ void convert_kernel(To* dst, const From* src, std::uint64_t n) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x)
    dst[i] = convert<To>(src[i]);
}

template <class T>
__global__ void fill_kernel(T* dst, T value, std::uint64_t n) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

// out[i] = store_mean(out[i], sum[i], world, accumulate): the host's reduce_range after its reduce-scatter.
template <class G, class R>
__global__ void store_mean_kernel(G* out, const R* sum, std::uint64_t n, R world, int accumulate) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x)
    out[i] = store_mean(out[i], sum[i], world, accumulate != 0);
}

template <class To, class From>
cudaError_t launch_convert(To* dst, const From* src, std::uint64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  convert_kernel<To, From><<<elementwise_grid(n), block_threads, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

template <class G, class R>
cudaError_t launch_store_mean(G* out, const R* sum, std::uint64_t n, R world, bool accumulate, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  store_mean_kernel<G, R><<<elementwise_grid(n), block_threads, 0, stream>>>(out, sum, n, world, accumulate ? 1 : 0);
  return cudaGetLastError();
}

// Construction of the optimizers' buffers: `n` elements, every one `value`, or the first `count` converted from
// src (the rest, a ZeRO shard's padding, uninitialised); enqueued on `stream`. Throw mpopt::error naming `what`.
template <class T>
device_buffer<T> filled_buffer(std::size_t n, T value, const std::string& what, cudaStream_t stream) {
  device_buffer<T> b(n, what);
  if (n > 0) {
    fill_kernel<T><<<elementwise_grid(n), block_threads, 0, stream>>>(b.get(), value, n);
    throw_if_cuda_error(cudaGetLastError(), "launch of the initialisation of the " + what);
  }
  return b;
}
template <class To, class From>
device_buffer<To> converted_buffer(std::size_t n, const From* src, std::size_t count, const std::string& what,
                                   cudaStream_t stream) {
  device_buffer<To> b(n, what);
  throw_if_cuda_error(launch_convert(b.get(), src, count, stream), "launch of the initialisation of the " + what);
  return b;
}

}  // namespace mpopt::cuda
