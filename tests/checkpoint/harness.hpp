// Shared by the checkpoint tests (host and MPI): scratch directories and whole-file reads and writes, a loss scaler
// that moves within a few steps, expected errors, a two-group model with deterministic params and grads, a snapshot
// of everything an mpopt::optimizer holds (a Kahan master's compensation too), gathered to full size, compared bit for
// bit, and the checkpoints the consolidation tool's test reads.
#pragma once

#include <doctest/doctest.h>
#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/mpopt.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

namespace ckpt_test {

// This process's scratch directories (host tests): scratch("name") is a fresh path <temp>/<prefix><pid>/name; the
// whole root goes with the object (at exit, for a global one).
class scratch_space {
 public:
  explicit scratch_space(const std::string& prefix)
      : root_(std::filesystem::temp_directory_path() / (prefix + std::to_string(::getpid()))) {}
  scratch_space(const scratch_space&) = delete;
  scratch_space& operator=(const scratch_space&) = delete;
  ~scratch_space() {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }
  std::string operator()(const std::string& name) const {
    const std::filesystem::path p = root_ / name;
    std::filesystem::remove_all(p);
    return p.string();
  }

 private:
  std::filesystem::path root_;
};

inline std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
inline void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// The message of the mpopt::error that f() throws; "" when it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const mpopt::error& e) {
    return e.what();
  }
  return "";
}
// An error was thrown and its message has every fragment.
inline void check_error(const std::string& msg, const std::vector<std::string>& fragments) {
  CAPTURE(msg);
  REQUIRE(!msg.empty());
  for (const auto& f : fragments) CHECK_MESSAGE(msg.find(f) != std::string::npos, "missing: " << f);
}

// A dynamic scaler that grows and backs off within a few steps (its state must then resume exactly); the other
// scalers' defaults.
template <class Scaler>
typename Scaler::args scaler_args() {
  if constexpr (std::is_same_v<Scaler, mpopt::dynamic_scaler>) {
    mpopt::dynamic_scale_args a;
    a.init_scale = 1024.f;
    a.scale_window = 2;
    a.hysteresis = 1;
    return a;
  } else {
    return {};
  }
}

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
inline constexpr bool is_kahan_v =
    std::is_same_v<typename Opt::precision_type::master_rounding, mpopt::kahan_summation>;

// Group g's full compensation (kahan_summation). Collective when the optimizer is sharded.
template <class Opt>
std::vector<typename Opt::master_t> gather_compensation(Opt& opt, std::size_t g) {
  const std::size_t n = opt.layout(g).size;
  const mpopt::zero::range local = opt.local_range(g);
  std::vector<typename Opt::master_t> full(n);
  std::copy(opt.compensation(g), opt.compensation(g) + local.size(), full.begin() + std::ptrdiff_t(local.begin));
  if (opt.zero().stage >= 1 && opt.communicator().size() > 1)
    opt.communicator().all_gather(full.data(), opt.layout(g).counts());
  return full;
}

// The weight a Kahan master holds, master + compensation, recomputed in fp64 and rounded once to fp32 (the sum of
// two 16-bit values of the magnitudes these tests produce is exact in fp64).
template <class M>
float kahan_weight_ref(M master, M compensation) {
  return float(double(float(master)) + double(float(compensation)));
}

template <class Opt>
struct snapshot {
  std::vector<std::vector<typename Opt::master_t>> master;
  std::vector<std::vector<typename Opt::master_t>> compensation;  // kahan_summation only
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
    if constexpr (is_kahan_v<Opt>) s.compensation.push_back(gather_compensation(opt, g));
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
template <class T>
bool same_groups(const std::vector<std::vector<T>>& a, const std::vector<std::vector<T>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t g = 0; g < a.size(); ++g)
    if (!same_bits(a[g], b[g])) return false;
  return true;
}

// "" when equal, else what differs first.
template <class Opt>
std::string diff(const snapshot<Opt>& a, const snapshot<Opt>& b) {
  if (a.step != b.step) return "step " + std::to_string(a.step) + " vs " + std::to_string(b.step);
  if constexpr (!std::is_empty_v<typename Opt::scaler_state_type>)
    if (std::memcmp(&a.scaler, &b.scaler, sizeof a.scaler) != 0) return "scaler state";
  for (std::size_t g = 0; g < a.master.size(); ++g) {
    if (!same_bits(a.master[g], b.master[g])) return "group " + std::to_string(g) + " master";
    if (a.compensation.size() != b.compensation.size() ||
        (g < a.compensation.size() && !same_bits(a.compensation[g], b.compensation[g])))
      return "group " + std::to_string(g) + " compensation";
    if (!same_bits(a.params[g], b.params[g])) return "group " + std::to_string(g) + " params";
    for (std::size_t j = 0; j < a.states[g].size(); ++j)
      if (!same_bits(a.states[g][j], b.states[g][j]))
        return "group " + std::to_string(g) + " state " + std::to_string(j);
  }
  return "";
}

// A checkpoint of `model` after 3 steps, over c at ZeRO `stage`, in `dir`.
template <class Rule, class Prec>
void save_after_three_steps(mpopt::comm::communicator& c, int stage, const std::string& dir) {
  mpopt::zero_options z;
  z.stage = stage;
  model<Rule, Prec> m(1);
  mpopt::optimizer<Rule, Prec, mpopt::no_scaler> o(m.specs({}), c, z);
  for (int k = 0; k < 3; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  mpopt::checkpoint::save(o, dir);
}

// For the mpopt-consolidate ctest (tests/checkpoint/consolidate_test.cmake), collective over c: where
// MPOPT_CHECKPOINT_FIXTURE names a directory, a LAMB checkpoint with an fp32 master (stage 2) and, where
// MPOPT_CHECKPOINT_FIXTURE_KAHAN does too, an all-bf16 Kahan one (stage 1).
inline void save_consolidation_fixtures(mpopt::comm::communicator& c) {
  const char* where = std::getenv("MPOPT_CHECKPOINT_FIXTURE");
  if (where == nullptr) return;
  save_after_three_steps<mpopt::lamb, mpopt::bf16_mixed_policy>(c, 2, where);
  if (const char* kahan_where = std::getenv("MPOPT_CHECKPOINT_FIXTURE_KAHAN"))
    save_after_three_steps<mpopt::adamw, mpopt::bf16_kahan_policy>(c, 1, kahan_where);
}

}  // namespace ckpt_test
