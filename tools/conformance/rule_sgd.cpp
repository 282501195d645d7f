#include "optimizer_case.hpp"

namespace mpopt::conformance {

nlohmann::json run_sgd(const optimizer_case& c) {
  using A = sgd::args;
  const hparam_setters<A> setters = {
      {"lr", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr = number_at(v, w); }},
      {"momentum", [](A& a, const nlohmann::json& v, const std::string& w) { a.momentum = number_at(v, w); }},
      {"dampening", [](A& a, const nlohmann::json& v, const std::string& w) { a.dampening = number_at(v, w); }},
      {"weight_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.weight_decay = number_at(v, w); }},
      {"nesterov", [](A& a, const nlohmann::json& v, const std::string& w) { a.nesterov = bool_at(v, w); }},
  };
  return run_rule<sgd>(c, parse_hparams(c.hparams, setters, c.optimizer));
}

}  // namespace mpopt::conformance
