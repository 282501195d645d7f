// Stochastic rounding and Kahan summation of a bf16 master (policy/rounding.hpp): an update that round-to-nearest
// loses entirely is kept in expectation by stochastic rounding and by Kahan's compensation; a longer bf16 + Kahan
// run tracks the fp32-master run.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../../examples/train.hpp"
#include "mpopt/mpopt.hpp"

namespace {

constexpr std::size_t n = 4 * 4096;  // elements: several reduction blocks and OpenMP chunks
constexpr int steps = 100;
constexpr double update = 1e-4;  // per step; half a bf16 ulp at 1.0 is 2^-8 = 0.0039

// SGD with lr 1 and grad -1e-4 adds 1e-4 to weights that start at 1.0, `steps` times.
template <class Prec>
std::vector<float> small_updates(std::uint64_t seed = 0x6d706f7074ull, std::vector<float>* compensation = nullptr) {
  std::vector<mpopt::bf16_t> params(n, mpopt::bf16_t(1.f));
  std::vector<mpopt::bf16_t> grads(n, mpopt::bf16_t(float(-update)));
  mpopt::param_group<mpopt::sgd, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  g.hparams.lr = 1.0;
  mpopt::step_options o;
  o.rounding_seed = seed;
  mpopt::optimizer<mpopt::sgd, Prec> opt({g}, {}, o);
  for (int s = 0; s < steps; ++s) REQUIRE(opt.step().applied);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = float(params[i]);
  if (compensation != nullptr) {
    REQUIRE(opt.compensation(0) != nullptr);
    compensation->resize(n);
    for (std::size_t i = 0; i < n; ++i) (*compensation)[i] = float(opt.compensation(0)[i]);
  }
  return out;
}

// The exact result in the arithmetic of the update: the grad is bf16(-1e-4), the step w - 1 * g in float.
double exact_sum() {
  return 1.0 + steps * -double(float(mpopt::bf16_t(float(-update))));
}

}  // namespace

TEST_CASE("round to nearest loses an update below half an ulp, every step") {
  for (float w : small_updates<mpopt::bf16_pure_policy>()) REQUIRE(w == 1.f);
}

TEST_CASE("stochastic rounding keeps the update in expectation, deterministically per seed") {
  const std::vector<float> w = small_updates<mpopt::bf16_stochastic_policy>();
  double mean = 0;
  int distinct_from_one = 0;
  for (float x : w) {
    mean += x;
    distinct_from_one += x != 1.f;
  }
  mean /= double(n);
  // Each weight is a sum of 100 independent roundings, each with variance <= ulp^2 / 4 (ulp = 2^-7), so its standard
  // deviation is <= 0.039 and that of the mean of 16384 weights <= 0.0003: 5 sigma is 0.0015.
  CHECK(std::fabs(mean - exact_sum()) < 0.0015);
  CHECK(distinct_from_one > int(n) / 2);  // the bulk moved (to 1.0078 or 1.0156): the rounding is not biased down
  // The bits depend on the seed only: the same seed again gives them, another seed other ones.
  CHECK(small_updates<mpopt::bf16_stochastic_policy>() == w);
  CHECK(small_updates<mpopt::bf16_stochastic_policy>(12345) != w);
}

TEST_CASE("Kahan summation keeps the update: weight + compensation is the exact sum") {
  std::vector<float> comp;
  const std::vector<float> w = small_updates<mpopt::bf16_kahan_policy>(0, &comp);
  const double exact = exact_sum();  // 1.0099...
  for (std::size_t i = 0; i < n; ++i) {
    // The stored weight is within one bf16 ulp (2^-7 at 1.0) of the exact sum, and with its compensation within the
    // compensation's own rounding (a bf16 of magnitude < 2^-8: error < 2^-17) times the steps.
    REQUIRE(std::fabs(double(w[i]) - exact) <= 0x1p-7);
    REQUIRE(std::fabs(double(w[i]) + double(comp[i]) - exact) < steps * 0x1p-17);
  }
  CHECK(w[0] > 1.f);
}

TEST_CASE("a bf16 + Kahan AdamW run tracks the fp32-master run; round to nearest falls behind") {
  const mlp_demo::dataset data = mlp_demo::make_dataset(mlp_demo::shape{}, 256, 1);
  mpopt::adamw::args hp;
  hp.lr = 2e-4;  // small steps: most updates are below half a bf16 ulp of their weight
  hp.weight_decay = 1e-4;
  constexpr int train_steps = 300;
  const auto fp32_master = mlp_demo::train<mpopt::bf16_mixed_policy>(data, train_steps, hp);
  const auto kahan = mlp_demo::train<mpopt::bf16_kahan_policy>(data, train_steps, hp);
  const auto nearest = mlp_demo::train<mpopt::bf16_pure_policy>(data, train_steps, hp);
  const double start = fp32_master.steps.front().loss;
  const double progress_fp32 = start - fp32_master.final_loss;
  REQUIRE(progress_fp32 > 0.1 * start);  // the reference run trains
  // Kahan: within 5 % of the fp32-master run's loss reduction; round to nearest: measured well behind it.
  CHECK(std::fabs(double(kahan.final_loss) - fp32_master.final_loss) < 0.05 * progress_fp32);
  CHECK(start - nearest.final_loss < 0.9 * progress_fp32);
  MESSAGE("final loss: fp32 master " << fp32_master.final_loss << ", bf16 + Kahan " << kahan.final_loss
                                     << ", bf16 nearest " << nearest.final_loss << " (start " << start << ")");
}
