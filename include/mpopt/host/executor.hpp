// The host backend: a step over flat buffers for any rule and precision policy.
// Loops only: the element math is rule/, the type changes are numeric/convert.hpp.
// It is the reference the tests check and the CPU-offload optimizer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../numeric/convert.hpp"
#include "../policy/rounding.hpp"
#include "../zero/partition.hpp"

namespace mpopt::host {

// Reductions are summed per fixed block, then across blocks in order, so results do not depend on
// the number of threads.
inline constexpr std::size_t reduce_block = 4096;
static_assert(reduce_block == zero::shard_alignment,
              "ZeRO shards start on the reduction block grid: keep zero::shard_alignment == host::reduce_block");
// Below this many elements a parallel region costs more than it saves.
inline constexpr std::ptrdiff_t parallel_threshold = 1 << 15;

// Sum of squares (double) and a non-finite flag of x[0, n) converted to float, in one read-only pass.
struct grad_stats {
  double sum_sq = 0.0;
  bool nonfinite = false;
};

// The per-block partial sums of squares of x[0, n) converted to float, one per reduce_block elements
// (ceil(n / reduce_block) of them), written to `partial`; returns whether any element is non-finite. Blocks start at
// x, so a caller whose x starts on the block grid of a larger buffer gets that buffer's blocks.
template <class G>
bool reduce_grad_partials(const G* x, std::size_t n, double* partial) {
  const std::ptrdiff_t blocks = std::ptrdiff_t((n + reduce_block - 1) / reduce_block);
  int nonfinite = 0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(| : nonfinite) if (std::ptrdiff_t(n) > parallel_threshold)
#endif
  for (std::ptrdiff_t b = 0; b < blocks; ++b) {
    const std::size_t begin = std::size_t(b) * reduce_block, end = std::min(n, begin + reduce_block);
    // Eight interleaved partial sums: independent lanes the compiler can vectorise without reassociating, summed
    // in a fixed order, so the result is the same on every run and thread count.
    constexpr std::size_t lanes = 8;
    double acc[lanes] = {};
    int bad = 0;
    std::size_t i = begin;
    for (; i + lanes <= end; i += lanes) {
      for (std::size_t l = 0; l < lanes; ++l) {
        const double v = double(convert<float>(x[i + l]));
        acc[l] += v * v;
        bad |= int(v - v != 0.0);  // inf - inf and NaN - NaN are NaN: non-finite, without a branch
      }
    }
    for (std::size_t l = 0; i < end; ++i, ++l) {
      const double v = double(convert<float>(x[i]));
      acc[l] += v * v;
      bad |= int(v - v != 0.0);
    }
    double s = 0.0;
    for (double a : acc) s += a;
    partial[b] = s;
    nonfinite |= bad;
  }
  return nonfinite != 0;
}

// The partials added in block order: the one summation order every backend and world size shares.
inline double sum_in_order(const double* partial, std::size_t count) {
  double s = 0.0;
  for (std::size_t i = 0; i < count; ++i) s += partial[i];
  return s;
}

template <class G>
grad_stats reduce_grad_stats(const G* x, std::size_t n) {
  std::vector<double> partial((n + reduce_block - 1) / reduce_block);
  grad_stats r;
  r.nonfinite = reduce_grad_partials(x, n, partial.data());
  r.sum_sq = sum_in_order(partial.data(), partial.size());
  return r;
}

// One parameter group's buffers. `param` and `master` are the same memory when the policy has no
// separate master; states[j] has `n` elements for j < num_states.
template <class Prec, int MaxStates>
struct group_view {
  using param_t = typename Prec::param_t;
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;

  param_t* param = nullptr;
  master_t* master = nullptr;
  const grad_t* grad = nullptr;
  state_t* states[MaxStates > 0 ? MaxStates : 1] = {};
  std::size_t n = 0;
  // Stochastic rounding and Kahan summation of a 16-bit master (policy/rounding.hpp); unused with nearest_rounding.
  master_store_ctx<master_t> rounding{};
};

namespace detail {

// The first NS of the rule's max_states slots come from the state buffers; the rest are zero scratch.
template <class Prec, int NS, int MS, class Load>
MPOPT_FORCEINLINE void load_states(typename Prec::compute_t (&s)[MS], const Load& states, std::size_t i) {
  for (int j = 0; j < NS; ++j) s[j] = convert<typename Prec::compute_t>(states[j][i]);
  for (int j = NS; j < MS; ++j) s[j] = typename Prec::compute_t(0);
}

template <class Prec, int NS, int MS, class Store>
MPOPT_FORCEINLINE void store_states(const typename Prec::compute_t (&s)[MS], const Store& states, std::size_t i) {
  for (int j = 0; j < NS; ++j) states[j][i] = convert<typename Prec::state_t>(s[j]);
}

// Writes the new master w (rounded once, by the policy's master rounding; w_old is the stored master it replaces)
// and the param copy (the rounded master, rounded to the param type).
template <class Prec>
MPOPT_FORCEINLINE void store_weight(typename Prec::master_t* master, typename Prec::param_t* param, std::size_t i,
                                    typename Prec::compute_t w, typename Prec::compute_t w_old,
                                    const master_store_ctx<typename Prec::master_t>& ctx) {
  const typename Prec::master_t m = round_master<typename Prec::master_rounding>(w, w_old, ctx, i);
  master[i] = m;
  if constexpr (Prec::separate_master) param[i] = convert<typename Prec::param_t>(m);
}

// Elementwise rules over compute-type arrays, with the state count fixed at compile time so the loop vectorises.
// The pointers are restrict: otherwise every store could alias the others and the loop would reload them.
// GCC vectorises it with -fno-math-errno (sqrt without errno) and -fno-trapping-math (selects in the 16-bit
// conversions); without them it runs scalar, with the same results.
template <class Rule, int NS, class Coeffs, class C>
MPOPT_FORCEINLINE void elementwise_loop(C* __restrict w, const C* __restrict g, C* __restrict st0, C* __restrict st1,
                                        C* __restrict st2, const Coeffs& k, C grad_factor, std::size_t n) {
  MPOPT_PRAGMA_VECTORIZE
  for (std::size_t i = 0; i < n; ++i) {
    C s[3] = {C(0), C(0), C(0)};
    if constexpr (NS > 0) s[0] = st0[i];
    if constexpr (NS > 1) s[1] = st1[i];
    if constexpr (NS > 2) s[2] = st2[i];
    C wi = w[i];
    Rule::apply(k, wi, g[i] * grad_factor, s);
    if constexpr (NS > 0) st0[i] = s[0];
    if constexpr (NS > 1) st1[i] = s[1];
    if constexpr (NS > 2) st2[i] = s[2];
    w[i] = wi;
  }
}

// Widens (exactly) or narrows (rounding once) n elements: separate loops, each of which vectorises.
template <class To, class From>
MPOPT_FORCEINLINE void convert_n(const From* __restrict in, To* __restrict out, std::size_t n) {
  MPOPT_PRAGMA_VECTORIZE
  for (std::size_t i = 0; i < n; ++i) out[i] = convert<To>(in[i]);
}

#if defined(MPOPT_BF16_NARROW_AVX512)
// float -> bf16 with the CPU's conversion instruction where the build targets one (numeric/bf16.hpp): same bits.
MPOPT_FORCEINLINE void convert_n(const float* __restrict in, bf16_t* __restrict out, std::size_t n) {
  mpopt::detail::float_to_bf16_rn_avx512(in, out, n);
}
#endif

// The array itself where it already holds the compute type C, else the tile buffer it is staged in.
template <class T, class C>
MPOPT_FORCEINLINE auto staged_or_direct(T* array, C* buffer) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, C>) {
    (void)buffer;
    return array;
  } else {
    (void)array;
    return buffer;
  }
}

template <class Rule, class Prec, int NS, class View, class Coeffs, class C>
void elementwise_range(const View& v, const Coeffs& k, C grad_factor, std::size_t begin, std::size_t end) {
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;
  constexpr int MS = Rule::max_states > 0 ? Rule::max_states : 1;
  static_assert(MS <= 3, "elementwise_range: rules with more than 3 states need another slot here");
  // Named pointers, not an array of them: an indexed pointer load blocks vectorisation.
  state_t* st0 = v.states[0] + begin;
  state_t* st1 = MS > 1 ? v.states[MS > 1 ? 1 : 0] + begin : nullptr;
  state_t* st2 = MS > 2 ? v.states[MS > 2 ? 2 : 0] + begin : nullptr;
  constexpr bool all_compute = std::is_same_v<master_t, C> && std::is_same_v<grad_t, C> && std::is_same_v<state_t, C>;
  if constexpr (all_compute) {
    // Master, grads and states already in the compute type (so nearest_rounding): update them in place.
    elementwise_loop<Rule, NS>(v.master + begin, v.grad + begin, st0, st1, st2, k, grad_factor, end - begin);
    if constexpr (Prec::separate_master) convert_n(v.master + begin, v.param + begin, end - begin);
  } else {
    // 16-bit arrays: GCC does not vectorise a loop that loads and stores 16-bit structs among float math, so a tile
    // of each is widened into a compute-type buffer, updated by the all-compute loop with the compute-type arrays
    // (in place: no copies), and narrowed back. The roundings are the same, in the same places, as element by
    // element.
    constexpr bool stage_w = !std::is_same_v<master_t, C>, stage_g = !std::is_same_v<grad_t, C>,
                   stage_s = !std::is_same_v<state_t, C>;
    // Measured on Zen 5 (bench/RESULTS.md, host): with every array staged, 128 lets more of the conversions overlap
    // the division-bound update than 256; with fewer, 256 is faster. Either way the buffers stay in L1.
    constexpr std::size_t tile = stage_w && stage_g && stage_s ? 128 : 256;
    constexpr bool plain_store = std::is_same_v<typename Prec::master_rounding, nearest_rounding>;
    static_assert(plain_store || stage_w,
                  "elementwise_range: stochastic or Kahan master rounding needs a 16-bit master");
    alignas(64) C w[stage_w ? tile : 1], g[stage_g ? tile : 1], s0[stage_s ? tile : 1], s1[stage_s ? tile : 1],
        s2[stage_s ? tile : 1], w_old[plain_store ? 1 : tile];
    // Locals: the vector narrowing stores through may_alias types, after which v's members would be reloaded.
    master_t* const master = v.master;
    const grad_t* const grad = v.grad;
    typename Prec::param_t* const param = v.param;
    for (std::size_t t = 0; t < end - begin; t += tile) {
      const std::size_t n = std::min(tile, end - begin - t);
      const std::size_t at = begin + t;
      C* const wt = staged_or_direct(master + at, w);
      const C* const gt = staged_or_direct(grad + at, g);
      C* const s0t = NS > 0 ? staged_or_direct(st0 + t, s0) : s0;
      C* const s1t = NS > 1 ? staged_or_direct(st1 + t, s1) : s1;
      C* const s2t = NS > 2 ? staged_or_direct(st2 + t, s2) : s2;
      if constexpr (stage_w) convert_n(master + at, w, n);
      if constexpr (!plain_store) std::copy(w, w + n, w_old);
      if constexpr (stage_g) convert_n(grad + at, g, n);
      if constexpr (stage_s && NS > 0) convert_n(st0 + t, s0, n);
      if constexpr (stage_s && NS > 1) convert_n(st1 + t, s1, n);
      if constexpr (stage_s && NS > 2) convert_n(st2 + t, s2, n);
      elementwise_loop<Rule, NS>(wt, gt, s0t, s1t, s2t, k, grad_factor, n);
      if constexpr (stage_s && NS > 0) convert_n(s0, st0 + t, n);
      if constexpr (stage_s && NS > 1) convert_n(s1, st1 + t, n);
      if constexpr (stage_s && NS > 2) convert_n(s2, st2 + t, n);
      if constexpr (stage_w && plain_store) {
        convert_n(w, master + at, n);
      } else if constexpr (stage_w) {
        for (std::size_t i = 0; i < n; ++i)
          master[at + i] = round_master<typename Prec::master_rounding>(w[i], w_old[i], v.rounding, at + i);
      }
      if constexpr (Prec::separate_master) convert_n(master + at, param + at, n);
    }
  }
}

template <class Rule, class Prec, int NS, class View, class Coeffs, class C>
void elementwise(const View& v, const Coeffs& k, C grad_factor) {
  const std::ptrdiff_t blocks = std::ptrdiff_t((v.n + reduce_block - 1) / reduce_block);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(v.n) > parallel_threshold)
#endif
  for (std::ptrdiff_t b = 0; b < blocks; ++b) {
    const std::size_t begin = std::size_t(b) * reduce_block;
    elementwise_range<Rule, Prec, NS>(v, k, grad_factor, begin, std::min(v.n, begin + reduce_block));
  }
}

}  // namespace detail

// Applies `Rule` to every element of one group: master, states and the param copy written in one pass.
// `grad_factor` multiplies each gradient first (the combined unscale + clip factor; 1 for none).
template <class Rule, class Prec>
void update_elementwise(const group_view<Prec, Rule::max_states>& v,
                        const typename Rule::template coeffs<typename Prec::compute_t>& k, int num_states,
                        typename Prec::compute_t grad_factor) {
  static_assert(!Rule::per_tensor,
                "update_elementwise: this rule needs per-tensor norms; use per_tensor_partials and per_tensor_apply");
  static_assert(Rule::max_states <= 3, "update_elementwise: rules with more than 3 states need a new case here");
  switch (num_states) {
    case 0: return detail::elementwise<Rule, Prec, 0>(v, k, grad_factor);
    case 1: return detail::elementwise<Rule, Prec, (Rule::max_states >= 1 ? 1 : 0)>(v, k, grad_factor);
    case 2: return detail::elementwise<Rule, Prec, (Rule::max_states >= 2 ? 2 : 0)>(v, k, grad_factor);
    default: return detail::elementwise<Rule, Prec, (Rule::max_states >= 3 ? 3 : 0)>(v, k, grad_factor);
  }
}

// Rules with per-tensor trust ratios (LAMB), in two phases so that a sharded group can add the partial sums of
// every rank between them. Segments (zero::grid_segments) are pieces of one tensor within one reduce_block; indices
// are group indices and v[0] is group element `base`.
// Phase 1 advances and stores the states and writes, per segment, |w|^2 and |u|^2 (u: the rule's direction from
// the stored states) to partial[2s] and partial[2s + 1].
template <class Rule, class Prec>
void per_tensor_partials(const group_view<Prec, Rule::max_states>& v,
                         const typename Rule::template coeffs<typename Prec::compute_t>& k,
                         const std::vector<zero::segment>& segs, std::size_t base, typename Prec::compute_t grad_factor,
                         double* partial) {
  static_assert(Rule::per_tensor, "per_tensor_partials: this rule is elementwise; use update_elementwise");
  using C = typename Prec::compute_t;
  constexpr int NS = Rule::max_states;
  const std::ptrdiff_t count = std::ptrdiff_t(segs.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(v.n) > parallel_threshold)
#endif
  for (std::ptrdiff_t s = 0; s < count; ++s) {
    double ws = 0.0, us = 0.0;
    for (std::size_t i = segs[std::size_t(s)].begin - base; i < segs[std::size_t(s)].end - base; ++i) {
      C st[NS];
      detail::load_states<Prec, NS>(st, v.states, i);
      const C w = convert<C>(v.master[i]);
      Rule::update_states(k, convert<C>(v.grad[i]) * grad_factor, st);
      detail::store_states<Prec, NS>(st, v.states, i);
      detail::load_states<Prec, NS>(st, v.states, i);  // the direction uses the stored (rounded) states
      const C u = Rule::direction(k, w, st);
      ws += double(w) * double(w);
      us += double(u) * double(u);
    }
    partial[2 * s] = ws;
    partial[2 * s + 1] = us;
  }
}

// Phase 2: recomputes u from the stored states and applies it with its tensor's ratio (ratio[segment.tensor]).
template <class Rule, class Prec>
void per_tensor_apply(const group_view<Prec, Rule::max_states>& v,
                      const typename Rule::template coeffs<typename Prec::compute_t>& k,
                      const std::vector<zero::segment>& segs, std::size_t base, const typename Prec::compute_t* ratio) {
  using C = typename Prec::compute_t;
  constexpr int NS = Rule::max_states;
  const std::ptrdiff_t count = std::ptrdiff_t(segs.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (std::ptrdiff_t(v.n) > parallel_threshold)
#endif
  for (std::ptrdiff_t s = 0; s < count; ++s) {
    const zero::segment& seg = segs[std::size_t(s)];
    for (std::size_t i = seg.begin - base; i < seg.end - base; ++i) {
      C st[NS];
      detail::load_states<Prec, NS>(st, v.states, i);
      const C w_old = convert<C>(v.master[i]);
      C w = w_old;
      Rule::apply_direction(k, w, Rule::direction(k, w, st), ratio[seg.tensor]);
      detail::store_weight<Prec>(v.master, v.param, i, w, w_old, v.rounding);
    }
  }
}

// Per tensor, the sums of its segments' partials in segment order, and the rule's trust ratio from them, in
// ratio[0, tensors); `sums` is scratch for 2 * tensors doubles (no allocation: the optimizer keeps both).
template <class Rule, class C, class K>
void trust_ratios(const K& k, const std::vector<zero::segment>& segs, const double* partial, std::size_t tensors,
                  double* sums, C* ratio) {
  double* w_sq = sums;
  double* u_sq = sums + tensors;
  std::fill(sums, sums + 2 * tensors, 0.0);
  for (std::size_t s = 0; s < segs.size(); ++s) {
    w_sq[segs[s].tensor] += partial[2 * s];
    u_sq[segs[s].tensor] += partial[2 * s + 1];
  }
  for (std::size_t t = 0; t < tensors; ++t) ratio[t] = Rule::trust_ratio(k, std::sqrt(w_sq[t]), std::sqrt(u_sq[t]));
}

}  // namespace mpopt::host
