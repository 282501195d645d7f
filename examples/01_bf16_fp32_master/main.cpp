// Example 01: bf16 params and grads with an fp32 master copy, the usual mixed-precision setup.
//
// The model computes in bf16 (its params and grads are bf16_t); mpopt keeps an fp32 master copy of the weights and
// fp32 AdamW states, applies the update there and writes the rounded result back into the bf16 params. Next to it
// runs the same training with a bf16 master (DeepSpeed's bf16_master_weights_and_grads): updates smaller than
// half a bf16 ulp of a weight are rounded away, so it stalls at a higher loss.
#include <cstdio>
#include <random>
#include <vector>

#include <mpopt/numeric/convert.hpp>
#include <mpopt/optimizer.hpp>
#include <mpopt/rule/adam.hpp>

// y = X w_true + noise: 256 samples with 16 features.
struct problem {
  int n = 256, d = 16;
  std::vector<float> x, y;
};

problem make_problem() {
  problem p;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> w_true(std::size_t(p.d));
  for (float& v : w_true) v = normal(rng);
  for (int i = 0; i < p.n; ++i) {
    float t = 0.01f * normal(rng);
    for (int k = 0; k < p.d; ++k) {
      p.x.push_back(normal(rng));
      t += p.x.back() * w_true[std::size_t(k)];
    }
    p.y.push_back(t);
  }
  return p;
}

// Mean squared error / 2 on params of type P, its gradient rounded into grads of type G (what a bf16 backward gives).
template <class P, class G>
float loss_and_grad(const problem& p, const P* w, G* grad) {
  std::vector<float> wf(std::size_t(p.d)), gf(std::size_t(p.d), 0.f);
  for (int k = 0; k < p.d; ++k) wf[std::size_t(k)] = mpopt::convert<float>(w[k]);
  double loss = 0;
  for (int i = 0; i < p.n; ++i) {
    const float* xi = &p.x[std::size_t(i) * p.d];
    float e = -p.y[std::size_t(i)];
    for (int k = 0; k < p.d; ++k) e += xi[k] * wf[std::size_t(k)];
    loss += 0.5 * double(e) * e / p.n;
    for (int k = 0; k < p.d; ++k) gf[std::size_t(k)] += e * xi[k] / float(p.n);
  }
  for (int k = 0; k < p.d; ++k) grad[k] = mpopt::convert<G>(gf[std::size_t(k)]);
  return float(loss);
}

// Trains with the precision policy Prec and returns the final loss.
template <class Prec>
float train(const problem& p, int steps) {
  using param_t = typename Prec::param_t;  // mpopt::bf16_t here
  using grad_t = typename Prec::grad_t;
  std::vector<param_t> w(std::size_t(p.d), mpopt::convert<param_t>(0.f));
  std::vector<grad_t> g(std::size_t(p.d));

  mpopt::param_group<mpopt::adamw, Prec> group;
  group.params = w.data();
  group.grads = g.data();
  group.size = w.size();
  group.hparams.lr = 0.01;
  group.hparams.weight_decay = 0.0;
  mpopt::optimizer<mpopt::adamw, Prec> opt({group});  // the master starts as a copy of the params

  for (int step = 0; step < steps; ++step) {
    loss_and_grad(p, w.data(), g.data());
    opt.step();
  }
  return loss_and_grad(p, w.data(), g.data());
}

int main() {
  const problem p = make_problem();
  using namespace mpopt;
  using bf16_fp32_master = precision<param<bf16_t>, master<float>, grad<bf16_t>, state<float>>;  // = bf16_mixed_policy
  using bf16_bf16_master = precision<param<bf16_t>, master<bf16_t>, grad<bf16_t>, state<float>>;
  const float mixed = train<bf16_fp32_master>(p, 1000);
  const float pure = train<bf16_bf16_master>(p, 1000);
  const float fp32 = train<fp32_policy>(p, 1000);
  std::printf("final loss after 1000 AdamW steps:\n");
  std::printf("  bf16 params, fp32 master  %.6f\n", mixed);
  std::printf("  bf16 params, bf16 master  %.6f\n", pure);
  std::printf("  fp32 throughout           %.6f\n", fp32);
  const bool ok = mixed < 2e-3f;
  std::printf("%s: bf16 with an fp32 master reaches loss %.6f (%s 2e-3)\n", ok ? "PASS" : "FAIL", mixed,
              ok ? "<" : ">=");
  return ok ? 0 : 1;
}
