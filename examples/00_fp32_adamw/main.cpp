// Example 00: the smallest mpopt program. A linear model fitted with AdamW, everything in fp32, on the host.
//
// The model owns its params and grads in flat buffers; mpopt is told where they are (a param_group) and each
// step() reads the grads and updates the params in place.
#include <cstdio>
#include <random>
#include <vector>

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

// Mean squared error / 2, and its gradient written into `grad`.
float loss_and_grad(const problem& p, const float* w, float* grad) {
  double loss = 0;
  for (int k = 0; k < p.d; ++k) grad[k] = 0.f;
  for (int i = 0; i < p.n; ++i) {
    const float* xi = &p.x[std::size_t(i) * p.d];
    float e = -p.y[std::size_t(i)];
    for (int k = 0; k < p.d; ++k) e += xi[k] * w[k];
    loss += 0.5 * double(e) * e / p.n;
    for (int k = 0; k < p.d; ++k) grad[k] += e * xi[k] / float(p.n);
  }
  return float(loss);
}

int main() {
  const problem p = make_problem();
  std::vector<float> w(std::size_t(p.d), 0.f), g(std::size_t(p.d), 0.f);

  // One group: the buffers and AdamW's hyper-parameters (torch.optim.AdamW's defaults, except lr and decay).
  mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> group;
  group.params = w.data();
  group.grads = g.data();
  group.size = w.size();
  group.hparams.lr = 0.05;
  group.hparams.weight_decay = 0.0;

  // fp32_policy: params, master, grads and states all fp32 (the param buffer is the master: no second copy).
  mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> opt({group});

  float loss = 0;
  for (int step = 0; step < 300; ++step) {
    loss = loss_and_grad(p, w.data(), g.data());  // forward + backward
    const mpopt::step_result r = opt.step();      // update w from g
    if (step % 50 == 0) std::printf("step %3d  loss %.6f  grad norm %.4f\n", step, loss, r.grad_norm);
  }
  loss = loss_and_grad(p, w.data(), g.data());
  std::printf("final loss %.6f after %lld steps\n", loss, static_cast<long long>(opt.step_count()));
  std::printf("%s: final loss %s 1e-3\n", loss < 1e-3f ? "PASS" : "FAIL", loss < 1e-3f ? "<" : ">=");
  return loss < 1e-3f ? 0 : 1;
}
