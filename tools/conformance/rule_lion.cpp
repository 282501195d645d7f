#include "optimizer_case.hpp"

namespace mpopt::conformance {

nlohmann::json run_lion(const optimizer_case& c) {
  using A = lion::args;
  const hparam_setters<A> setters = {
      {"lr", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr = number_at(v, w); }},
      {"betas", [](A& a, const nlohmann::json& v, const std::string& w) { set_betas(a, v, w); }},
      {"weight_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.weight_decay = number_at(v, w); }},
  };
  return run_rule<lion>(c, parse_hparams(c.hparams, setters, c.optimizer));
}

}  // namespace mpopt::conformance
