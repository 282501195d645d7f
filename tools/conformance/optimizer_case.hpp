// Internal to mpopt-conformance: a parsed optimizer case and the runner every rule shares.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "conformance.hpp"
#include "mpopt/optimizer.hpp"
#include "mpopt/policy/supported.hpp"
#include "mpopt/rules.hpp"

namespace mpopt::conformance {

struct optimizer_case {
  std::string optimizer;
  dtype param = dtype::fp32, master = dtype::fp32, grad = dtype::fp32, state = dtype::fp32;
  nlohmann::json hparams = nlohmann::json::object();
  std::vector<double> w0;
  std::vector<std::vector<double>> grads;
  std::vector<std::size_t> tensor_sizes;  // optional; per-tensor rules (LAMB) use it
  double max_grad_norm = 0.0;             // optional
  zero_run zero;                          // not from the case: how to run it
};

// Reads `j` as a number (not a bool), or throws bad_input naming `where`.
double number_at(const nlohmann::json& j, const std::string& where);
bool bool_at(const nlohmann::json& j, const std::string& where);
// A library validation failure as bad input.
void throw_if_bad(const status& s);
std::string unsupported_policy_message(const optimizer_case& c);

// Maps torch.optim keyword names onto a rule's args, starting from `a` (torch's defaults); an unknown key is
// bad input.
template <class Args>
using hparam_setters = std::map<std::string, std::function<void(Args&, const nlohmann::json&, const std::string&)>>;

template <class Args>
Args parse_hparams(const nlohmann::json& h, const hparam_setters<Args>& setters, const std::string& rule,
                   Args a = Args{}) {
  for (auto it = h.begin(); it != h.end(); ++it) {
    auto s = setters.find(it.key());
    if (s == setters.end()) throw bad_input("hparams." + it.key() + ": unknown key for optimizer \"" + rule + "\"");
    s->second(a, it.value(), "hparams." + it.key());
  }
  return a;
}

// Sets a pair of double fields from a two-number list, as torch's `betas`.
template <class Args>
void set_betas(Args& a, const nlohmann::json& v, const std::string& where) {
  if (!v.is_array() || v.size() != 2) throw bad_input(where + ": expected a list of two numbers, got " + v.dump());
  a.beta1 = number_at(v[0], where + "[0]");
  a.beta2 = number_at(v[1], where + "[1]");
}

template <class Rule, class Prec>
nlohmann::json run_case(const optimizer_case& c, const typename Rule::args& hp) {
  using opt_t = optimizer<Rule, Prec, no_scaler>;
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  const std::size_t n = c.w0.size();
  std::vector<param_t> params(n);
  std::vector<grad_t> grads(n);
  param_group<Rule, Prec> group;
  group.params = params.data();
  group.grads = grads.data();
  group.size = n;
  group.tensor_sizes = c.tensor_sizes;
  group.hparams = hp;
  step_options opts;
  opts.max_grad_norm = c.max_grad_norm;
  mpopt::zero_options z;
  z.stage = c.zero.stage;
  comm::single_rank one;
  opt_t opt({group}, c.zero.comm != nullptr ? *c.zero.comm : one, z, {}, opts);
  opt.set_master(0, c.w0.data(), n);  // w0 rounded once to the master type, param copy from the master

  nlohmann::json traj = nlohmann::json::array(), master = nlohmann::json::array();
  std::vector<param_t> p_full(n);
  std::vector<typename Prec::master_t> m_full(n);
  for (const auto& step_grads : c.grads) {
    for (std::size_t i = 0; i < n; ++i) grads[i] = convert<grad_t>(step_grads[i]);
    opt.step();
    opt.gather_params(0, p_full.data());
    opt.gather_master(0, m_full.data());
    nlohmann::json p = nlohmann::json::array(), m = nlohmann::json::array();
    for (std::size_t i = 0; i < n; ++i) {
      p.push_back(convert<double>(p_full[i]));
      m.push_back(convert<double>(m_full[i]));
    }
    traj.push_back(std::move(p));
    master.push_back(std::move(m));
  }
  return {{"traj", std::move(traj)}, {"master", std::move(master)}};
}

// Runs the case under the policy its dtypes name; bad_input when the policy is not supported.
template <class Rule>
nlohmann::json run_rule(const optimizer_case& c, const typename Rule::args& hp) {
  throw_if_bad(Rule::validate(hp));
  nlohmann::json out;
  const bool found = dispatch_precision(c.param, c.master, c.grad, c.state,
                                        [&](auto prec) { out = run_case<Rule, decltype(prec)>(c, hp); });
  if (!found) throw bad_input(unsupported_policy_message(c));
  return out;
}

nlohmann::json run_adam(const optimizer_case& c);
nlohmann::json run_sgd(const optimizer_case& c);
nlohmann::json run_adagrad(const optimizer_case& c);
nlohmann::json run_lamb(const optimizer_case& c);
nlohmann::json run_lion(const optimizer_case& c);

}  // namespace mpopt::conformance
