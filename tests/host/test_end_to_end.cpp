// The examples' MLP trained end to end on the host: bf16 params with an fp32 master, and fp16 with dynamic
// loss scaling from a too-large initial scale, each against the same run in fp32.
#include <doctest/doctest.h>

#include <cmath>

#include "../../examples/train.hpp"
#include "mpopt/mpopt.hpp"

namespace {

const mlp_demo::dataset& data() {
  static const mlp_demo::dataset d = mlp_demo::make_dataset(mlp_demo::shape{}, 256, 1);
  return d;
}

mpopt::adamw::args demo_hparams() {
  mpopt::adamw::args hp;
  hp.lr = 1e-2;
  hp.weight_decay = 1e-4;
  return hp;
}

}  // namespace

TEST_CASE("bf16 params with an fp32 master train like fp32") {
  const auto full = mlp_demo::train<mpopt::fp32_policy>(data(), 300, demo_hparams());
  const auto mixed = mlp_demo::train<mpopt::bf16_mixed_policy>(data(), 300, demo_hparams());
  // Training works at all: the loss falls by more than 10x.
  CHECK(full.final_loss < full.steps.front().loss / 10);
  // The model reads bf16 weights (8 significant bits, relative rounding error up to 2^-9 per weight), so its
  // loss is that of a perturbed fp32 model: measured 0.16% at 300 steps; the bound is 2%.
  constexpr double mixed_tolerance = 0.02;
  CHECK(std::fabs(double(mixed.final_loss) - full.final_loss) / full.final_loss < mixed_tolerance);
}

TEST_CASE("fp16 with dynamic loss scaling: overflow steps are skipped, the scale settles, the loss matches fp32") {
  mpopt::dynamic_scale_args scaler = mpopt::dynamic_scale_args::deepspeed();
  scaler.init_scale = 0x1p30f;
  scaler.scale_window = 50;
  mpopt::step_options options;
  options.max_grad_norm = 1.0;
  const auto fp16 =
      mlp_demo::train<mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(data(), 300, demo_hparams(), scaler, options);
  const auto fp32 = mlp_demo::train<mpopt::fp32_policy>(data(), 300, demo_hparams(), {}, options);

  // 2^30 times gradients of order 1 overflows fp16 (max 65504): the first steps skip while the scale backs off
  // (the first overflow absorbed by hysteresis), then every step applies and the scale doubles every 50 clean steps.
  int first_applied = -1;
  for (std::size_t i = 0; i < fp16.steps.size() && first_applied < 0; ++i)
    if (fp16.steps[i].result.applied) first_applied = int(i);
  REQUIRE(first_applied >= 10);
  for (int i = 0; i < first_applied; ++i) {
    const auto& r = fp16.steps[std::size_t(i)].result;
    CHECK(r.reason == mpopt::skip_reason::nonfinite_grads);
    CHECK(r.event == (i == 0 ? mpopt::scale_event::absorbed : mpopt::scale_event::backed_off));
  }
  for (std::size_t i = std::size_t(first_applied); i < fp16.steps.size(); ++i) {
    const auto& r = fp16.steps[i].result;
    CHECK(r.applied);
    const bool growth_step = (int(i) - first_applied) % 50 == 0 && int(i) > first_applied;
    CHECK(r.event == (growth_step ? mpopt::scale_event::grew : mpopt::scale_event::unchanged));
  }
  CHECK(fp16.steps[std::size_t(first_applied)].result.loss_scale < 65504.0 * 4);

  // Skipped steps do not update, so compare with fp32 after the same number of updates. fp16 weights carry
  // 11 significant bits (rounding error up to 2^-12 relative), so the model is a slightly perturbed fp32 model:
  // measured 0.002% at 300 steps; the bound is 0.5%.
  const int applied = int(fp16.steps.size()) - first_applied;
  const double reference = fp32.steps[std::size_t(applied)].loss;
  constexpr double fp16_tolerance = 0.005;
  CHECK(std::fabs(double(fp16.final_loss) - reference) / reference < fp16_tolerance);
}
