// DeepSpeed's combined unscale + clip: one multiply of every grad by 1 / (S * max(1, k)),
// k = (||g|| / S + 1e-6) / max_grad_norm, where ||g|| / S is the norm of the unscaled grads. The same
// formula is in DeepSpeed's FP16_Optimizer, FP16_UnfusedOptimizer, ZeRO-1/2 and ZeRO-3. Written once,
// MPOPT_HOST_DEVICE, for the host backend and the CUDA step kernel.
#pragma once

#include <math.h>  // ::sqrt(double), callable from host and device code

#include "../config.hpp"

namespace mpopt {

struct grad_factor {
  float factor;     // multiply every (scaled) grad by this
  float grad_norm;  // norm of the unscaled grads before clipping: sqrt(scaled_sum_sq) / S
  float clip_coef;  // what clipping multiplies the unscaled grads by: 1 / max(1, k); 1 when clipping is off
};

// scaled_sum_sq: sum of squares of the grads as produced with loss scale `scale` (> 0).
// max_grad_norm <= 0 disables clipping, so factor = 1 / scale.
// Precision: everything is computed in double from the double sum of squares and each output is rounded to
// float once; DeepSpeed likewise forms 1/combined as a Python float (double) and torch casts it to float to
// multiply an fp32 grad. A non-finite sum (reached only when overflow checking is off) never clips when NaN
// and gives factor 0 when +inf.
MPOPT_HOST_DEVICE inline grad_factor combined_grad_factor(double scaled_sum_sq, float scale, float max_grad_norm) {
  const double s = scale;
  const double norm = ::sqrt(scaled_sum_sq) / s;
  double combined = s, clip_coef = 1.0;
  if (max_grad_norm > 0) {
    const double k = (norm + 1e-6) / double(max_grad_norm);
    if (k > 1) {  // DeepSpeed: `if clip > 1` (torch.clamp(k, min=1) under ZeRO)
      combined = k * s;
      clip_coef = 1.0 / k;
    }
  }
  grad_factor f;
  f.factor = float(1.0 / combined);
  f.grad_norm = float(norm);
  f.clip_coef = float(clip_coef);
  return f;
}

}  // namespace mpopt
