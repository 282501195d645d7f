#include "optimizer_case.hpp"

namespace mpopt::conformance {

// "adam": torch.optim.Adam (L2 decay); "adamw": torch.optim.AdamW (decoupled). Same rule, one flag.
nlohmann::json run_adam(const optimizer_case& c) {
  using A = adam::args;
  const hparam_setters<A> setters = {
      {"lr", [](A& a, const nlohmann::json& v, const std::string& w) { a.lr = number_at(v, w); }},
      {"betas", [](A& a, const nlohmann::json& v, const std::string& w) { set_betas(a, v, w); }},
      {"eps", [](A& a, const nlohmann::json& v, const std::string& w) { a.eps = number_at(v, w); }},
      {"weight_decay", [](A& a, const nlohmann::json& v, const std::string& w) { a.weight_decay = number_at(v, w); }},
      {"amsgrad", [](A& a, const nlohmann::json& v, const std::string& w) { a.amsgrad = bool_at(v, w); }},
      {"bias_correction",
       [](A& a, const nlohmann::json& v, const std::string& w) { a.bias_correction = bool_at(v, w); }},
  };
  const A start = c.optimizer == "adamw" ? A(adamw::args{}) : A{};
  return run_rule<adam>(c, parse_hparams(c.hparams, setters, c.optimizer, start));
}

}  // namespace mpopt::conformance
