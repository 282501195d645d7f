// fp16 training with DeepSpeed's dynamic loss scaling, started from a deliberately too-large scale:
// the first steps overflow and are skipped, the scale backs off and settles, and the run ends close to
// the fp32 one. Prints the scale history.
#include <cmath>
#include <cstdio>

#include "mpopt/mpopt.hpp"
#include "train.hpp"

int main() {
  using namespace mpopt;
  const mlp_demo::shape s;
  const mlp_demo::dataset data = mlp_demo::make_dataset(s, 256, 1);
  adamw::args hp;
  hp.lr = 1e-2;
  hp.weight_decay = 1e-4;
  const int steps = 300;

  dynamic_scale_args scaler = dynamic_scale_args::deepspeed();
  scaler.init_scale = 0x1p30f;  // far too large: fp16 grads overflow until it backs off
  scaler.scale_window = 50;
  step_options options;
  options.max_grad_norm = 1.0;

  const auto fp16 = mlp_demo::train<fp16_mixed_policy, dynamic_scaler>(data, steps, hp, scaler, options);
  const auto fp32 = mlp_demo::train<fp32_policy>(data, steps, hp, {}, options);

  std::printf("fp16 params/grads, fp32 master, dynamic loss scale from 2^30 (window %lld, hysteresis %d)\n",
              static_cast<long long>(scaler.scale_window), scaler.hysteresis);
  std::printf("%5s  %12s  %9s  %10s  %10s  %12s\n", "step", "loss scale", "applied", "event", "loss", "fp32 loss");
  int skipped = 0;
  for (int i = 0; i < steps; ++i) {
    const auto& r = fp16.steps[std::size_t(i)].result;
    skipped += r.applied ? 0 : 1;
    if (i < 20 || i % 25 == 0 || r.event == scale_event::grew || !r.applied)
      std::printf("%5d  %12.0f  %9s  %10s  %10.6f  %12.6f\n", i, r.loss_scale, r.applied ? "yes" : "SKIPPED",
                  to_string(r.event), fp16.steps[std::size_t(i)].loss, fp32.steps[std::size_t(i)].loss);
  }
  std::printf("skipped %d of %d steps; final scale %.0f\n", skipped, steps, fp16.steps.back().result.next_loss_scale);
  // Skipped steps do not update: compare with fp32 after the same number of applied steps.
  const float reference = fp32.steps[std::size_t(steps - skipped)].loss;
  std::printf("final loss after %d updates: fp16 %.6f vs fp32 %.6f (relative difference %.2f%%)\n", steps - skipped,
              fp16.final_loss, reference, 100.0 * std::fabs(double(fp16.final_loss) - reference) / reference);
  return 0;
}
