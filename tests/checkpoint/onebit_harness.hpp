// Shared by the 1-bit checkpoint tests (host and MPI): a two-group model, each rule's hyper-parameters and save
// point, and a snapshot of everything a 1-bit optimizer holds on this rank, compared byte for byte.
#pragma once

#include <mpopt/onebit/optimizer.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "harness.hpp"

namespace ckpt_test {

// Two groups: several tensors (one empty), and one tensor (no tensor_sizes). The tests give each rank its own grads
// (make_grads), in a struct derived from this one.
inline const std::vector<std::vector<std::size_t>>& onebit_tensors() {
  static const std::vector<std::vector<std::size_t>> t = {{700, 0, 1300, 333}, {}};
  return t;
}
inline constexpr std::size_t onebit_sizes[2] = {2333, 500};

template <class Rule, class Prec>
struct onebit_model {
  using param_t = typename Prec::param_t;
  static_assert(std::is_same_v<param_t, typename Prec::grad_t>, "the tests' policies have param_t == grad_t");
  std::vector<std::vector<param_t>> params, grads;

  explicit onebit_model(std::uint64_t seed) {
    for (std::size_t g = 0; g < 2; ++g) {
      params.emplace_back(onebit_sizes[g]);
      grads.emplace_back(onebit_sizes[g]);
      for (std::size_t i = 0; i < onebit_sizes[g]; ++i) params[g][i] = mpopt::convert<param_t>(0.5 * noise(seed, g, i));
    }
  }
  std::vector<mpopt::param_group<Rule, Prec>> specs(const typename Rule::args& hp, std::size_t groups = 2) {
    std::vector<mpopt::param_group<Rule, Prec>> out;
    for (std::size_t g = 0; g < groups; ++g) {
      mpopt::param_group<Rule, Prec> s;
      s.params = params[g].data();
      s.grads = grads[g].data();
      s.size = onebit_sizes[g];
      s.tensor_sizes = onebit_tensors()[g];
      s.hparams = hp;
      out.push_back(s);
    }
    return out;
  }
};

// fp32 etc. need the opt-in; fp16 params and grads do not.
template <class Opt>
mpopt::onebit::options options_for() {
  mpopt::onebit::options o;
  o.accept_unverified_precision = !Opt::verified_precision;
  return o;
}

// 0/1 Adam: warm-up exact steps 1, 2, 4, compressed 3; local phase from 5: synchronisations at 5, 6, 8, 12, 16, so a
// save after step 10 is in the middle of an interval, with lr accumulated.
template <class Rule>
typename Rule::args onebit_hparams() {
  typename Rule::args a;
  a.lr = 0.01;
  a.weight_decay = 0.01;
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
    a.var_freeze_step = 4;
    a.var_update_scaler = 2;
    a.local_step_scaler = 2;
    a.local_step_clipper = 4;
  } else {
    a.freeze_step = 3;
  }
  return a;
}
// Steps before the save: past the warm-up, in the compressed (0/1 Adam: local) phase.
template <class Rule>
int save_after() {
  return std::is_same_v<Rule, mpopt::zero_one_adam> ? 10 : 5;
}

// Everything an optimizer holds on this rank (no communication), as named byte strings.
using onebit_snapshot = std::vector<std::pair<std::string, std::string>>;

template <class T>
void add_part(onebit_snapshot& s, const std::string& name, const T* p, std::size_t n) {
  s.emplace_back(name, std::string(reinterpret_cast<const char*>(p), n * sizeof(T)));
}

// The error buffers too where `errors`.
template <class Rule, class Prec, class Scaler>
onebit_snapshot take_onebit(const mpopt::onebit::optimizer<Rule, Prec, Scaler>& o, bool errors = true) {
  onebit_snapshot s;
  const std::int64_t step = o.step_count();
  add_part(s, "step", &step, 1);
  if constexpr (!std::is_empty_v<typename Scaler::state_type>) add_part(s, "scaler state", &o.scaler_state(), 1);
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) add_part(s, "schedule", &o.current_schedule(), 1);
  for (std::size_t g = 0; g < o.num_groups(); ++g) {
    const std::string k = "group " + std::to_string(g) + " ";
    add_part(s, k + "master", o.master(g), o.size(g));
    for (int j = 0; j < Rule::max_states; ++j) add_part(s, k + Rule::state_names[j], o.state(g, j), o.size(g));
    if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
      add_part(s, k + "sync point", o.sync_point(g), o.size(g));
      const double lr = o.accumulated_lr(g);
      add_part(s, k + "accumulated lr", &lr, 1);
    }
    if constexpr (std::is_same_v<Rule, mpopt::onebit_lamb>)
      add_part(s, k + "lamb state", o.lamb_state(g).data(), o.lamb_state(g).size());
  }
  for (std::size_t i = 0; errors && i < o.num_error_buffers(); ++i) {
    add_part(s, "errors " + std::to_string(i) + " worker", o.errors(i).worker.data(), o.errors(i).worker.size());
    add_part(s, "errors " + std::to_string(i) + " server", o.errors(i).server.data(), o.errors(i).server.size());
  }
  return s;
}

// "" when equal, else the first part that differs.
inline std::string diff(const onebit_snapshot& a, const onebit_snapshot& b) {
  if (a.size() != b.size()) return "number of parts";
  for (std::size_t k = 0; k < a.size(); ++k)
    if (a[k].first != b[k].first || a[k].second != b[k].second) return a[k].first;
  return "";
}

}  // namespace ckpt_test
