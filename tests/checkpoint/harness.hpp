// Shared by the checkpoint tests (host and MPI): a two-group model with deterministic params and grads, and a
// snapshot of everything an optimizer holds, gathered to full size, compared bit for bit.
#pragma once

#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/mpopt.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace ckpt_test {

// A deterministic value in [-1, 1) (splitmix64).
inline double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return double(x >> 11) / double(1ull << 52) - 1.0;
}

// Group 0's tensors straddle shard boundaries (4096-element alignment), with a zero-sized one; at 4 ranks its last
// rank owns nothing. Group 1 is one tensor (no tensor_sizes).
inline const std::vector<std::vector<std::size_t>>& tensors() {
  static const std::vector<std::vector<std::size_t>> t = {{3000, 0, 7000, 11, 9989, 1}, {}};
  return t;
}
inline std::size_t group_size(std::size_t g) {
  return g == 0 ? 20001 : 9000;
}

template <class Rule, class Prec>
struct model {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<std::vector<param_t>> params;
  std::vector<std::vector<grad_t>> grads;

  explicit model(std::uint64_t seed) {
    for (std::size_t g = 0; g < 2; ++g) {
      params.emplace_back(group_size(g));
      grads.emplace_back(group_size(g));
      for (std::size_t i = 0; i < group_size(g); ++i) params[g][i] = mpopt::convert<param_t>(noise(seed, g, i));
    }
  }
  std::vector<mpopt::param_group<Rule, Prec>> specs(const typename Rule::args& hp) {
    std::vector<mpopt::param_group<Rule, Prec>> out;
    for (std::size_t g = 0; g < 2; ++g) {
      mpopt::param_group<Rule, Prec> s;
      s.params = params[g].data();
      s.grads = grads[g].data();
      s.size = group_size(g);
      s.tensor_sizes = tensors()[g];
      s.hparams = hp;
      out.push_back(s);
    }
    return out;
  }
  // The grads of step k (the same on every rank); an inf at the overflow step.
  void make_grads(int k, int overflow_step, double magnitude) {
    for (std::size_t g = 0; g < 2; ++g)
      for (std::size_t i = 0; i < group_size(g); ++i)
        grads[g][i] = mpopt::convert<grad_t>(magnitude * noise(1000 + std::uint64_t(k), g, i));
    if (k == overflow_step) grads[0][777] = mpopt::convert<grad_t>(std::numeric_limits<double>::infinity());
  }
};

template <class Opt>
struct snapshot {
  std::vector<std::vector<typename Opt::master_t>> master;
  std::vector<std::vector<std::vector<typename Opt::state_t>>> states;
  std::vector<std::vector<typename Opt::param_t>> params;
  std::int64_t step = 0;
  typename Opt::scaler_state_type scaler{};
};

// Collective over the optimizer's communicator.
template <class Opt>
snapshot<Opt> take(Opt& opt) {
  snapshot<Opt> s;
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t n = opt.layout(g).size;
    s.master.emplace_back(n);
    opt.gather_master(g, s.master.back().data());
    s.states.emplace_back();
    for (int j = 0; j < opt.num_states(g); ++j) {
      s.states.back().emplace_back(n);
      opt.gather_state(g, j, s.states.back().back().data());
    }
    s.params.emplace_back(n);
    opt.gather_params(g, s.params.back().data());
  }
  s.step = opt.step_count();
  s.scaler = opt.scaler_state();
  return s;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// "" when equal, else what differs first.
template <class Opt>
std::string diff(const snapshot<Opt>& a, const snapshot<Opt>& b) {
  if (a.step != b.step) return "step " + std::to_string(a.step) + " vs " + std::to_string(b.step);
  if constexpr (!std::is_empty_v<typename Opt::scaler_state_type>)
    if (std::memcmp(&a.scaler, &b.scaler, sizeof a.scaler) != 0) return "scaler state";
  for (std::size_t g = 0; g < a.master.size(); ++g) {
    if (!same_bits(a.master[g], b.master[g])) return "group " + std::to_string(g) + " master";
    if (!same_bits(a.params[g], b.params[g])) return "group " + std::to_string(g) + " params";
    for (std::size_t j = 0; j < a.states[g].size(); ++j)
      if (!same_bits(a.states[g][j], b.states[g][j]))
        return "group " + std::to_string(g) + " state " + std::to_string(j);
  }
  return "";
}

}  // namespace ckpt_test
