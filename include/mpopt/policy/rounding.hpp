// How a 16-bit master weight takes its update: the rounding option of the precision policy's master role,
// master<bf16_t, stochastic_rounding> or master<bf16_t, kahan_summation> (default: nearest_rounding).
//   nearest_rounding     round to nearest even, as everywhere else. An update below half an ulp of the weight is
//                        lost: at 1.0 a bf16 weight ignores any step smaller than 2^-9.
//   stochastic_rounding  rounds up with probability (dropped fraction / ulp), so the stored weight equals the exact
//                        one in expectation. The random bits come from Philox4x32-10 keyed on (seed, group) with the
//                        counter (element index in its group, step): deterministic, independent of threads, ranks
//                        and ZeRO stage, and needing no state beyond the seed and the step count.
//   kahan_summation      keeps, per weight, what rounding dropped (a compensation buffer of the master type, 2 more
//                        bytes per parameter with a bf16 master) and adds it to the next update, so the sum of the
//                        updates is kept up to the compensation's own rounding.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "../numeric/convert.hpp"

namespace mpopt {

struct nearest_rounding {};
struct stochastic_rounding {};
struct kahan_summation {};

template <class R>
inline constexpr bool is_master_rounding_v =
    std::is_same_v<R, nearest_rounding> || std::is_same_v<R, stochastic_rounding> || std::is_same_v<R, kahan_summation>;

namespace detail {

MPOPT_HOST_DEVICE MPOPT_FORCEINLINE std::uint32_t mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi) {
  const std::uint64_t p = std::uint64_t(a) * b;
  hi = std::uint32_t(p >> 32);
  return std::uint32_t(p);
}

}  // namespace detail

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the first 32-bit word of the
// block for `counter` under `key`. The same constants as cuRAND's and numpy's Philox.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE std::uint32_t philox4x32_10(const std::uint32_t (&counter)[4],
                                                                const std::uint32_t (&key)[2]) {
  std::uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  std::uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, hi1;
    const std::uint32_t lo0 = detail::mulhilo32(0xD2511F53u, c0, hi0);
    const std::uint32_t lo1 = detail::mulhilo32(0xCD9E8D57u, c2, hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// What the master store needs beyond the values: the Philox key and step (stochastic), the group's element index of
// the first element handled, and the compensation buffer (Kahan) at that element.
template <class M>
struct master_store_ctx {
  std::uint32_t key[2] = {0, 0};
  std::uint64_t step = 0;
  std::uint64_t first_index = 0;
  M* compensation = nullptr;
};

// The Philox key of the group tagged `group_tag` (< 2^16) under `seed`: the tag in the high 16 bits, so that groups
// draw independent bits from one seed.
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE constexpr std::uint64_t group_rounding_key(std::uint64_t seed,
                                                                               std::uint64_t group_tag) {
  return seed ^ (group_tag << 48);
}

// The context for the elements from `first_index` of a group keyed `key`, at step `step` (the step being applied).
template <class M>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE master_store_ctx<M> make_master_store_ctx(std::uint64_t key, std::uint64_t step,
                                                                              std::uint64_t first_index,
                                                                              M* compensation) {
  master_store_ctx<M> ctx;
  ctx.key[0] = std::uint32_t(key);
  ctx.key[1] = std::uint32_t(key >> 32);
  ctx.step = step;
  ctx.first_index = first_index;
  ctx.compensation = compensation;
  return ctx;
}

// The stored master for the new weight w (compute type) of element i of the context, whose old stored value widened
// is w_old. The one place the rounding options act; both backends call it.
template <class Rounding, class M, class C>
MPOPT_HOST_DEVICE MPOPT_FORCEINLINE M round_master(C w, C w_old, const master_store_ctx<M>& ctx, std::uint64_t i) {
  if constexpr (std::is_same_v<Rounding, stochastic_rounding>) {
    (void)w_old;
    const std::uint64_t index = ctx.first_index + i;
    const std::uint32_t counter[4] = {std::uint32_t(index), std::uint32_t(index >> 32), std::uint32_t(ctx.step),
                                      std::uint32_t(ctx.step >> 32)};
    return convert<M, C, round_stochastic>(w, philox4x32_10(counter, ctx.key));
  } else if constexpr (std::is_same_v<Rounding, kahan_summation>) {
    // y: this update plus what earlier roundings dropped; the stored weight takes what it can hold of it.
    const C y = (w - w_old) + convert<C>(ctx.compensation[i]);
    const M stored = convert<M>(w_old + y);
    ctx.compensation[i] = convert<M>(y - (convert<C>(stored) - w_old));
    return stored;
  } else {
    (void)w_old;
    (void)ctx;
    (void)i;
    return convert<M>(w);
  }
}

}  // namespace mpopt
