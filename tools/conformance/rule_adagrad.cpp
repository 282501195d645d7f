#include "optimizer_case.hpp"

namespace mpopt::conformance {

nlohmann::json run_adagrad(const optimizer_case& c) {
  using A = adagrad::args;
  const hparam_setters<A> setters = {
      {"lr", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr = number_at(v, w); }},
      {"lr_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr_decay = number_at(v, w); }},
      {"weight_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.weight_decay = number_at(v, w); }},
      {"initial_accumulator_value",
       [](A& a, const nlohmann::json& v, const std::string& w) { a.initial_accumulator_value = number_at(v, w); }},
      {"eps", [](A& a, const nlohmann::json& v, const std::string& w) { a.eps = number_at(v, w); }},
  };
  return run_rule<adagrad>(c, parse_hparams(c.hparams, setters, c.optimizer));
}

}  // namespace mpopt::conformance
