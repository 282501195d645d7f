// mpopt demo: a two-layer MLP trained on the CPU with bf16 params and grads and an fp32 master
// (AdamW, fp32 states), next to the same run entirely in fp32.
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

  using bf16_master_fp32 = precision<param<bf16_t>, master<float>, grad<bf16_t>, state<float>>;
  const auto mixed = mlp_demo::train<bf16_master_fp32>(data, steps, hp);
  const auto full = mlp_demo::train<fp32_policy>(data, steps, hp);

  std::printf("mpopt %d.%d.%d demo: MLP %d-%d-%d (%zu params), %d samples, AdamW lr %g\n", MPOPT_VERSION_MAJOR,
              MPOPT_VERSION_MINOR, MPOPT_VERSION_PATCH, s.in, s.hidden, s.out, s.size(), data.n, hp.lr);
  std::printf("%6s  %24s  %15s\n", "step", "bf16 params, fp32 master", "fp32 throughout");
  for (int i = 0; i < steps; i += 25)
    std::printf("%6d  %24.6f  %15.6f\n", i, mixed.steps[std::size_t(i)].loss, full.steps[std::size_t(i)].loss);
  std::printf("%6s  %24.6f  %15.6f\n", "final", mixed.final_loss, full.final_loss);
  const double rel = std::fabs(double(mixed.final_loss) - full.final_loss) / full.final_loss;
  std::printf("final loss: bf16/fp32-master %.6f vs fp32 %.6f (relative difference %.2f%%)\n", mixed.final_loss,
              full.final_loss, 100.0 * rel);
  return 0;
}
