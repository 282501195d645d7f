// mpopt demo: a two-layer MLP trained on the CPU with bf16 params and grads (AdamW, fp32 states unless the master
// is bf16), next to the same run entirely in fp32. --master picks the master weights:
//   fp32 (default)  an fp32 master: classic bf16 mixed precision
//   bf16            the bf16 params are the master, bf16 states (DeepSpeed bf16_master_weights_and_grads +
//                   bf16_optimizer_states), rounded to nearest: small updates are lost
//   bf16-sr         the same with stochastic rounding of the master
//   bf16-kahan      the same with Kahan summation (a bf16 compensation buffer)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mpopt/mpopt.hpp"
#include "train.hpp"

namespace {

int usage(const char* why) {
  std::fprintf(stderr,
               "mpopt_demo: %s\nusage: mpopt_demo [--master fp32|bf16|bf16-sr|bf16-kahan] [--steps N] [--lr X]\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace mpopt;
  std::string mode = "fp32";
  int steps = 300;
  adamw::args hp;
  hp.lr = 1e-2;
  hp.weight_decay = 1e-4;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return usage(("option " + a + " needs a value").c_str());
    const std::string v = argv[++i];
    char* end = nullptr;
    if (a == "--master") {
      mode = v;
    } else if (a == "--steps") {
      const long n = std::strtol(v.c_str(), &end, 10);
      if (*end != '\0' || n < 1 || n > 100000) return usage(("--steps must be 1..100000, got " + v).c_str());
      steps = int(n);
    } else if (a == "--lr") {
      hp.lr = std::strtod(v.c_str(), &end);
      if (*end != '\0' || !(hp.lr > 0) || !std::isfinite(hp.lr)) return usage(("--lr must be > 0, got " + v).c_str());
    } else {
      return usage(("unknown option " + a).c_str());
    }
  }

  const mlp_demo::shape s;
  const mlp_demo::dataset data = mlp_demo::make_dataset(s, 256, 1);
  mlp_demo::run mixed;
  if (mode == "fp32") {
    mixed = mlp_demo::train<precision<param<bf16_t>, master<float>, grad<bf16_t>, state<float>>>(data, steps, hp);
  } else if (mode == "bf16") {
    mixed = mlp_demo::train<bf16_pure_policy>(data, steps, hp);
  } else if (mode == "bf16-sr") {
    mixed = mlp_demo::train<bf16_stochastic_policy>(data, steps, hp);
  } else if (mode == "bf16-kahan") {
    mixed = mlp_demo::train<bf16_kahan_policy>(data, steps, hp);
  } else {
    return usage(("--master must be fp32, bf16, bf16-sr or bf16-kahan, got " + mode).c_str());
  }
  const auto full = mlp_demo::train<fp32_policy>(data, steps, hp);

  const std::string label = "bf16 params, " + mode + " master";
  std::printf("mpopt %d.%d.%d demo: MLP %d-%d-%d (%zu params), %d samples, AdamW lr %g\n", MPOPT_VERSION_MAJOR,
              MPOPT_VERSION_MINOR, MPOPT_VERSION_PATCH, s.in, s.hidden, s.out, s.size(), data.n, hp.lr);
  std::printf("%6s  %30s  %15s\n", "step", label.c_str(), "fp32 throughout");
  for (int i = 0; i < steps; i += 25)
    std::printf("%6d  %30.6f  %15.6f\n", i, mixed.steps[std::size_t(i)].loss, full.steps[std::size_t(i)].loss);
  std::printf("%6s  %30.6f  %15.6f\n", "final", mixed.final_loss, full.final_loss);
  const double rel = std::fabs(double(mixed.final_loss) - full.final_loss) / full.final_loss;
  std::printf("final loss: bf16/%s-master %.6f vs fp32 %.6f (relative difference %.2f%%)\n", mode.c_str(),
              mixed.final_loss, full.final_loss, 100.0 * rel);
  return 0;
}
