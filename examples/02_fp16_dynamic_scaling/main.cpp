// Example 02: fp16 params and grads, an fp32 master, and dynamic loss scaling (DeepSpeed's rule).
//
// fp16 grads underflow when they are small, so the loss is multiplied by a scale S before the backward pass and
// step() divides the grads by S again. Too large an S makes the grads overflow (inf): step() then skips the update,
// halves S (after `hysteresis` overflows) and the model is untouched. After `scale_window` clean steps S doubles.
// This run starts from a deliberately huge S = 2^24, so the first steps overflow and are skipped.
#include <cstdio>
#include <random>
#include <vector>

#include <mpopt/numeric/convert.hpp>
#include <mpopt/optimizer.hpp>
#include <mpopt/rule/adam.hpp>
#include <mpopt/scaler/scalers.hpp>

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

// Mean squared error / 2, and the gradient of (loss * scale) rounded into fp16 grads, as an fp16 backward gives it.
float loss_and_grad(const problem& p, const mpopt::half_t* w, mpopt::half_t* grad, float scale) {
  std::vector<float> wf(std::size_t(p.d)), gf(std::size_t(p.d), 0.f);
  for (int k = 0; k < p.d; ++k) wf[std::size_t(k)] = float(w[k]);
  double loss = 0;
  for (int i = 0; i < p.n; ++i) {
    const float* xi = &p.x[std::size_t(i) * p.d];
    float e = -p.y[std::size_t(i)];
    for (int k = 0; k < p.d; ++k) e += xi[k] * wf[std::size_t(k)];
    loss += 0.5 * double(e) * e / p.n;
    for (int k = 0; k < p.d; ++k) gf[std::size_t(k)] += scale * e * xi[k] / float(p.n);
  }
  for (int k = 0; k < p.d; ++k) grad[k] = mpopt::convert<mpopt::half_t>(gf[std::size_t(k)]);  // > 65504: inf
  return float(loss);
}

int main() {
  using namespace mpopt;
  const problem p = make_problem();
  std::vector<half_t> w(std::size_t(p.d), half_t(0.f)), g(std::size_t(p.d));

  param_group<adamw, fp16_mixed_policy> group;  // fp16 params and grads, fp32 master and states
  group.params = w.data();
  group.grads = g.data();
  group.size = w.size();
  group.hparams.lr = 0.01;
  group.hparams.weight_decay = 0.0;

  dynamic_scale_args scaling = dynamic_scale_args::deepspeed();  // window 1000, hysteresis 2, min 1
  scaling.init_scale = 16777216.f;                               // 2^24: far too large on purpose
  scaling.scale_window = 100;
  step_options options;
  options.max_grad_norm = 1.0;  // clip the unscaled grads (DeepSpeed's gradient_clipping)
  optimizer<adamw, fp16_mixed_policy, dynamic_scaler> opt({group}, scaling, options);

  int skipped = 0;
  float loss = 0;
  for (int step = 0; step < 1000; ++step) {
    const float scale = float(opt.loss_scale());  // the scale for this backward
    loss = loss_and_grad(p, w.data(), g.data(), scale);
    const step_result r = opt.step();
    if (!r.applied) ++skipped;
    if (!r.applied || r.event == scale_event::grew || step % 200 == 0)
      std::printf("step %4d  scale %9.0f  %-8s  %-10s  loss %.6f\n", step, r.loss_scale,
                  r.applied ? "applied" : "SKIPPED", to_string(r.event), loss);
  }
  loss = loss_and_grad(p, w.data(), g.data(), 1.f);
  std::printf("skipped %d of 1000 steps, final scale %.0f, final loss %.6f\n", skipped, opt.loss_scale(), loss);
  const bool ok = skipped > 0 && loss < 2e-3f;
  std::printf("%s: overflowing steps were skipped and fp16 training reached loss %.6f (%s 2e-3)\n",
              ok ? "PASS" : "FAIL", loss, loss < 2e-3f ? "<" : ">=");
  return ok ? 0 : 1;
}
