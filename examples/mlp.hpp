// A two-layer MLP in plain C++ (forward, backward, mean-squared error) whose params and grads live in
// flat buffers of any mpopt element type: the model a host framework would hand to mpopt.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "mpopt/numeric/convert.hpp"

namespace mlp_demo {

struct shape {
  int in = 16, hidden = 32, out = 4;
  std::size_t w1() const { return std::size_t(in) * hidden; }
  std::size_t b1() const { return std::size_t(hidden); }
  std::size_t w2() const { return std::size_t(hidden) * out; }
  std::size_t b2() const { return std::size_t(out); }
  std::size_t size() const { return w1() + b1() + w2() + b2(); }
  std::vector<std::size_t> tensor_sizes() const { return {w1(), b1(), w2(), b2()}; }
};

// Regression data from a random "teacher" MLP of the same shape, plus a little noise.
struct dataset {
  shape s;
  int n = 256;
  std::vector<float> x, y;
};

inline std::vector<float> random_weights(const shape& s, std::uint32_t seed, float gain) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> w(s.size());
  const float a1 = gain / std::sqrt(float(s.in)), a2 = gain / std::sqrt(float(s.hidden));
  std::size_t i = 0;
  for (; i < s.w1(); ++i) w[i] = a1 * normal(rng);
  for (; i < s.w1() + s.b1(); ++i) w[i] = 0.1f * normal(rng);
  for (; i < s.w1() + s.b1() + s.w2(); ++i) w[i] = a2 * normal(rng);
  for (; i < s.size(); ++i) w[i] = 0.1f * normal(rng);
  return w;
}

// Forward pass on float weights; returns the hidden activations of one sample into h and the output into o.
inline void forward(const shape& s, const float* w, const float* x, float* h, float* o) {
  const float* w1 = w;
  const float* b1 = w1 + s.w1();
  const float* w2 = b1 + s.b1();
  const float* b2 = w2 + s.w2();
  for (int j = 0; j < s.hidden; ++j) {
    float a = b1[j];
    for (int k = 0; k < s.in; ++k) a += w1[std::size_t(j) * s.in + k] * x[k];
    h[j] = std::tanh(a);
  }
  for (int j = 0; j < s.out; ++j) {
    float a = b2[j];
    for (int k = 0; k < s.hidden; ++k) a += w2[std::size_t(j) * s.hidden + k] * h[k];
    o[j] = a;
  }
}

inline dataset make_dataset(const shape& s, int n, std::uint32_t seed) {
  dataset d{s, n, std::vector<float>(std::size_t(n) * s.in), std::vector<float>(std::size_t(n) * s.out)};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (float& v : d.x) v = normal(rng);
  const std::vector<float> teacher = random_weights(s, seed + 1, 2.0f);
  std::vector<float> h(std::size_t(s.hidden));
  for (int i = 0; i < n; ++i) {
    forward(s, teacher.data(), &d.x[std::size_t(i) * s.in], h.data(), &d.y[std::size_t(i) * s.out]);
    for (int j = 0; j < s.out; ++j) d.y[std::size_t(i) * s.out + j] += 0.01f * normal(rng);
  }
  return d;
}

// Mean-squared error over the whole dataset and its gradient times `loss_scale`, rounded into `grads`
// (as a framework's backward in the grad dtype would produce them). Params are read in their own type.
template <class ParamT, class GradT>
float loss_and_grad(const dataset& d, const ParamT* params, GradT* grads, float loss_scale) {
  const shape& s = d.s;
  std::vector<float> w(s.size()), g(s.size(), 0.f), h(std::size_t(s.hidden)), o(std::size_t(s.out));
  for (std::size_t i = 0; i < s.size(); ++i) w[i] = mpopt::convert<float>(params[i]);
  float* g1 = g.data();
  float* gb1 = g1 + s.w1();
  float* g2 = gb1 + s.b1();
  float* gb2 = g2 + s.w2();
  const float* w2 = w.data() + s.w1() + s.b1();
  double loss = 0.0;
  const float inv = 1.0f / float(d.n * s.out);
  std::vector<float> dh(std::size_t(s.hidden));
  for (int i = 0; i < d.n; ++i) {
    const float* x = &d.x[std::size_t(i) * s.in];
    forward(s, w.data(), x, h.data(), o.data());
    for (int j = 0; j < s.hidden; ++j) dh[std::size_t(j)] = 0.f;
    for (int j = 0; j < s.out; ++j) {
      const float e = o[std::size_t(j)] - d.y[std::size_t(i) * s.out + j];
      loss += double(e) * e;
      const float de = 2.f * e * inv * loss_scale;  // d(scaled loss)/d(output)
      gb2[j] += de;
      for (int k = 0; k < s.hidden; ++k) {
        g2[std::size_t(j) * s.hidden + k] += de * h[std::size_t(k)];
        dh[std::size_t(k)] += de * w2[std::size_t(j) * s.hidden + k];
      }
    }
    for (int j = 0; j < s.hidden; ++j) {
      const float da = dh[std::size_t(j)] * (1.f - h[std::size_t(j)] * h[std::size_t(j)]);
      gb1[j] += da;
      for (int k = 0; k < s.in; ++k) g1[std::size_t(j) * s.in + k] += da * x[k];
    }
  }
  for (std::size_t i = 0; i < s.size(); ++i) grads[i] = mpopt::convert<GradT>(g[i]);
  return float(loss * inv);
}

}  // namespace mlp_demo
