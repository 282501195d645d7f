// Prints a hash of the master weights and states after a few steps of every elementwise rule under several
// precision policies. tests/CMakeLists.txt builds this file once per x86-64 level (baseline SSE2, AVX2 + FMA,
// AVX-512) and tests/isa/compare.cmake requires the same output from each: the vector paths the compiler picks
// for each -march do the same arithmetic, with the same roundings, as the baseline.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mpopt/mpopt.hpp"

namespace {

struct fnv {
  std::uint64_t h = 1469598103934665603ull;
  template <class T>
  void add(const T* p, std::size_t n) {
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n * sizeof(T); ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
};

// Deterministic values of either sign over several binades, some near zero (subnormal 16-bit results).
float value(std::uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  const double u = double(s >> 11) * 0x1p-53;  // [0, 1)
  const double mag = std::ldexp(1.0, int(u * 30) - 24);
  return float((u * 1e4 - std::floor(u * 1e4) < 0.5 ? -1 : 1) * mag * (1 + u));
}

template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
void run(const char* name, typename Rule::args hp, mpopt::step_options opt = {}, typename Scaler::args scaler = {}) {
  // Not a multiple of the tile or the reduction block, over several blocks: every loop tail runs.
  constexpr std::size_t n = 3 * 4096 + 1000 + 7;
  std::uint64_t seed = 42;
  std::vector<typename Prec::param_t> params(n);
  for (auto& p : params) p = mpopt::convert<typename Prec::param_t>(value(seed));
  std::vector<typename Prec::grad_t> grads(n);
  mpopt::param_group<Rule, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  g.tensor_sizes = {1000, 7, n - 1007};
  g.hparams = hp;
  mpopt::optimizer<Rule, Prec, Scaler> o({g}, scaler, opt);
  fnv h;
  for (int step = 0; step < 5; ++step) {
    for (auto& x : grads) x = mpopt::convert<typename Prec::grad_t>(value(seed) * 64.f);
    const auto r = o.step();
    h.add(&r.applied, 1);
  }
  h.add(o.master(0), n);
  h.add(params.data(), n);
  for (int j = 0; j < o.num_states(0); ++j) h.add(o.state(0, j), n);
  std::printf("%-34s %016llx\n", name, static_cast<unsigned long long>(h.h));
}

}  // namespace

int main() {
  using namespace mpopt;
  using bf16_master_fp32_states = precision_of<bf16_t, bf16_t, bf16_t, float>;
  adamw::args aw;
  aw.lr = 1e-2;
  adam::args am;
  am.amsgrad = true;
  am.weight_decay = 1e-3;
  sgd::args sg;
  sg.lr = 0.1;
  sg.momentum = 0.9;
  sg.nesterov = true;
  lion::args li;
  adagrad::args ag;
  lamb::args la;
  step_options clip;
  clip.max_grad_norm = 1.0;
  dynamic_scale_args dyn = dynamic_scale_args::deepspeed();
  dyn.init_scale = 1024.f;

  run<adamw, fp32_policy>("adamw fp32", aw);
  run<adamw, fp32_policy>("adamw fp32 clip", aw, clip);
  run<adam, fp32_policy>("adam amsgrad fp32", am);
  run<adamw, bf16_mixed_policy>("adamw bf16 + fp32 master", aw);
  run<adamw, fp16_mixed_policy, dynamic_scaler>("adamw fp16 + dynamic scaler, clip", aw, clip, dyn);
  run<adamw, bf16_pure_policy>("adamw all-bf16", aw);
  run<adamw, bf16_master_fp32_states>("adamw bf16 master, fp32 states", aw);
  run<sgd, bf16_mixed_policy>("sgd nesterov bf16 + fp32 master", sg);
  run<lion, bf16_pure_policy>("lion all-bf16", li);
  run<adagrad, fp16_mixed_policy>("adagrad fp16 + fp32 master", ag);
  run<lamb, bf16_mixed_policy>("lamb bf16 + fp32 master", la);
  run<adamw, bf16_stochastic_policy>("adamw all-bf16, stochastic master", aw);
  run<adamw, bf16_kahan_policy>("adamw all-bf16, Kahan master", aw);
  run<lamb, bf16_kahan_policy>("lamb all-bf16, Kahan master", la);
  return 0;
}
