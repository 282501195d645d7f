// mpopt-conformance config CONFIG.json: reads a DeepSpeed config and prints the resolved mpopt configuration
// (every setting with its effective value, the warnings, and the optimizer type it dispatches to), exit 0; or the
// errors on stderr, exit 2. Warnings go to stderr as well.
#include <fstream>
#include <iostream>
#include <string>
#include <tuple>

#include <nlohmann/json.hpp>

#include "mpopt/deepspeed/config.hpp"
#include "mpopt/deepspeed/dispatch.hpp"

namespace mpopt::conformance {

int run_config_command(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    std::cerr << "mpopt-conformance: cannot open " << path << "\n";
    return 2;
  }
  nlohmann::json in;
  try {
    in = nlohmann::json::parse(file);
  } catch (const nlohmann::json::parse_error& e) {
    std::cerr << "mpopt-conformance: " << path << " is not valid JSON: " << e.what() << "\n";
    return 2;
  }
  const deepspeed::parse_result r = deepspeed::parse_config(in);
  for (const std::string& w : r.cfg.warnings) std::cerr << "mpopt-conformance: " << path << ": warning: " << w << "\n";
  if (!r.ok()) {
    for (const std::string& e : r.errors) std::cerr << "mpopt-conformance: " << path << ": error: " << e << "\n";
    return 2;
  }
  nlohmann::json out = deepspeed::to_json(r.cfg);
  // Whether this build's default set (every supported precision, rule, the 1-bit and Muon rules included, and
  // scaler) has the optimizer; the tag alone instantiates nothing.
  using rules = decltype(std::tuple_cat(deepspeed::default_rules{}, deepspeed::default_onebit_rules{},
                                        deepspeed::default_muon_rules{}));
  const status s = deepspeed::dispatch<supported_precisions, rules>(r.cfg, [](auto) {});
  out["dispatch"] = {{"available", s.ok()},
                     {"type", r.cfg.optimizer.name.empty() ? nlohmann::json(nullptr)
                                                           : nlohmann::json(deepspeed::optimizer_type_name(r.cfg))},
                     {"reason", s.ok() ? nlohmann::json(nullptr) : nlohmann::json(s.message)}};
  std::cout << out.dump(2) << "\n";
  return 0;
}

}  // namespace mpopt::conformance
