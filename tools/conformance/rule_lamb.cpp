#include "optimizer_case.hpp"

namespace mpopt::conformance {

nlohmann::json run_lamb(const optimizer_case& c) {
  using A = lamb::args;
  const hparam_setters<A> setters = {
      {"lr", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr = number_at(v, w); }},
      {"betas", [](A& a, const nlohmann::json& v, const std::string& w) { set_betas(a, v, w); }},
      {"eps", [](A& a, const nlohmann::json& v, const std::string& w) { a.eps = number_at(v, w); }},
      {"weight_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.weight_decay = number_at(v, w); }},
      {"bias_correction",
       [](A& a, const nlohmann::json& v, const std::string& w) { a.bias_correction = bool_at(v, w); }},
      {"max_coeff", [](A& a, const nlohmann::json& v, const std::string& w) { a.max_coeff = number_at(v, w); }},
      {"min_coeff", [](A& a, const nlohmann::json& v, const std::string& w) { a.min_coeff = number_at(v, w); }},
  };
  return run_rule<lamb>(c, parse_hparams(c.hparams, setters, c.optimizer));
}

}  // namespace mpopt::conformance
