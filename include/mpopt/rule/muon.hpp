// Muon (torch.optim.Muon, PyTorch >= 2.9): momentum, orthogonalised by a Newton–Schulz iteration, for 2-D
// parameters. Only the per-element parts live here (the momentum, the NS input, the final update), written once for
// both backends; the matrix part is host/newton_schulz.hpp and cuda/muon.cuh, the optimizer mpopt/muon.hpp.
//
// Per matrix G (rows x cols) and step:
//   buf = lerp(buf, g, 1 - momentum);  u = nesterov ? lerp(g, buf, momentum) : buf
//   X = u (transposed when rows > cols, so X is n x m with n <= m);  X = X / max(||X||_F, eps)
//   ns_steps times: A = X Xᵀ;  B = b·A + c·A·A;  X = a·X + B·X
//   w = w · (1 - lr · weight_decay);  w = w - adjusted_lr · X (transposed back)
// adjusted_lr = lr · sqrt(max(1, rows / cols)) ("original") or lr · 0.2 · sqrt(max(rows, cols)) ("match_rms_adamw").
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../numeric/bf16.hpp"
#include "common.hpp"

namespace mpopt {

// torch's adjust_lr_fn: "original" (Keller Jordan's) or "match_rms_adamw" (Moonshot's; reuses AdamW's lr and decay).
enum class muon_adjust_lr : std::uint8_t { original, match_rms_adamw };

inline const char* to_string(muon_adjust_lr a) {
  switch (a) {
    case muon_adjust_lr::original: return "original";
    case muon_adjust_lr::match_rms_adamw: return "match_rms_adamw";
  }
  return "?";
}

// The element type of the Newton–Schulz GEMM operands and results: float (fp32 GEMMs), or bf16_t (bf16 operands,
// products accumulated in fp32 and each result rounded once to bf16: the GPU's tensor-core path, and what torch does
// in bf16). The optimizer's third template argument.
template <class T>
struct muon_gemm {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16_t>,
                "mpopt::muon_gemm<T>: T must be float (fp32 GEMMs) or bf16_t (bf16 operands, fp32 accumulation)");
  using type = T;
};

struct muon {
  static constexpr const char* name = "muon";
  struct ns_coefficients_type {
    double a = 3.4445, b = -4.7750, c = 2.0315;  // Keller Jordan's quintic
  };
  struct args {
    double lr = 1e-3;
    double momentum = 0.95;
    bool nesterov = true;
    double weight_decay = 0.1;
    ns_coefficients_type ns_coefficients{};
    int ns_steps = 5;
    double eps = 1e-7;
    muon_adjust_lr adjust_lr = muon_adjust_lr::original;
  };

  static constexpr int max_states = 1;
  static constexpr bool per_tensor = false;
  static constexpr const char* state_names[max_states] = {"momentum_buffer"};
  static int num_states(const args&) { return 1; }
  static double initial_state(const args&, int) { return 0.0; }

  // torch accepts any momentum >= 0; above 1 the buffer diverges and 1 freezes it at zero, so [0, 1) here.
  static status validate(const args& a) {
    status s = detail::first_error(
        detail::check_nonnegative(name, "lr", a.lr), detail::check_beta(name, "momentum", a.momentum),
        detail::check_nonnegative(name, "weight_decay", a.weight_decay), detail::check_positive(name, "eps", a.eps),
        check_finite("ns_coefficients.a", a.ns_coefficients.a), check_finite("ns_coefficients.b", a.ns_coefficients.b),
        check_finite("ns_coefficients.c", a.ns_coefficients.c));
    if (!s.ok()) return s;
    if (a.ns_steps < 0 || a.ns_steps >= 100)  // torch's bound
      return status::invalid("muon.ns_steps must be in [0, 100), got " + std::to_string(a.ns_steps));
    if (a.adjust_lr != muon_adjust_lr::original && a.adjust_lr != muon_adjust_lr::match_rms_adamw)
      return status::invalid("muon.adjust_lr must be original or match_rms_adamw, got " +
                             std::to_string(int(a.adjust_lr)));
    return status::success();
  }

  // The lr the orthogonalised update is applied with, in double as torch forms it (a Python float).
  static double adjusted_lr(const args& a, std::size_t rows, std::size_t cols) {
    const double r = double(rows), c = double(cols);
    const double ratio = a.adjust_lr == muon_adjust_lr::match_rms_adamw ? 0.2 * std::sqrt(r > c ? r : c)
                                                                        : std::sqrt(r / c > 1.0 ? r / c : 1.0);
    return a.lr * ratio;
  }

  // Per-step scalars, formed in double and rounded once to C (torch passes Python floats to its kernels).
  template <class C>
  struct coeffs {
    C buffer_weight;    // 1 - momentum: buf.lerp_(g, 1 - momentum)
    C nesterov_weight;  // momentum: g.lerp(buf, momentum)
    C decay_factor;     // 1 - lr · weight_decay
    bool nesterov;
  };

  template <class C>
  MPOPT_HOST_DEVICE static coeffs<C> prepare(const args& a, std::int64_t /*step*/) {
    return {C(1.0 - a.momentum), C(a.momentum), C(1.0 - a.lr * a.weight_decay), a.nesterov};
  }

  // torch's lerp: start + w·(end - start) for |w| < 0.5, else end - (end - start)·(1 - w), exact at both ends.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static C lerp(C start, C end, C w) {
    const C small = start + w * (end - start);
    const C large = end - (end - start) * (C(1) - w);
    return (w < C(0.5) && w > C(-0.5)) ? small : large;
  }

  // The momentum buffer takes the (unscaled, clipped) gradient g.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void update_buffer(const coeffs<C>& k, C g, C& buf) {
    buf = lerp(buf, g, k.buffer_weight);
  }

  // The Newton–Schulz input from g and the stored (rounded) buffer.
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static C ns_input(const coeffs<C>& k, C g, C buf) {
    return k.nesterov ? lerp(g, buf, k.nesterov_weight) : buf;
  }

  // Decoupled decay, then the orthogonalised update o; neg_lr = -adjusted_lr rounded to C (param.add_(o, alpha=)).
  template <class C>
  MPOPT_HOST_DEVICE MPOPT_FORCEINLINE static void apply_update(const coeffs<C>& k, C& w, C o, C neg_lr) {
    w = w * k.decay_factor;
    w = w + neg_lr * o;
  }

  // Muon needs whole matrices: an elementwise optimizer cannot run it.
  template <class C, class S>
  static void apply(const coeffs<C>&, C&, C, S*) {
    static_assert(sizeof(C) == 0,
                  "mpopt::muon orthogonalises whole matrices and is not an elementwise rule: use "
                  "mpopt::muon_optimizer (mpopt/muon.hpp) or mpopt::cuda::muon_optimizer (mpopt/cuda/muon.cuh)");
  }

 private:
  static status check_finite(const char* field, double v) {
    if (std::isfinite(v)) return status::success();
    return detail::field_error(name, field, "finite", v);
  }
};

}  // namespace mpopt
