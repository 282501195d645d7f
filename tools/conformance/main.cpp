// mpopt-conformance: reads one case (JSON) and prints the library's answer (JSON), so anyone can check
// mpopt against a reference they trust.
//   mpopt-conformance optimizer CASE.json   -> {"traj": [...], "master": [...]}
//   mpopt-conformance scaler CASE.json      -> {"scale_before": [...], "hysteresis_after": [...], "raised_at": ...}
// Exit 0 on success; 2 with a message on stderr for malformed input or an unknown key.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "conformance.hpp"
#include "mpopt/error.hpp"

namespace {

// nlohmann prints the shortest round-trip form; the contract is 17 significant digits.
void write_json(std::ostream& os, const nlohmann::json& j) {
  if (j.is_array()) {
    os << '[';
    for (std::size_t i = 0; i < j.size(); ++i) {
      if (i) os << ", ";
      write_json(os, j[i]);
    }
    os << ']';
  } else if (j.is_object()) {
    os << '{';
    bool first = true;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!first) os << ", ";
      first = false;
      os << nlohmann::json(it.key()).dump() << ": ";
      write_json(os, it.value());
    }
    os << '}';
  } else if (j.is_number_float()) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", j.get<double>());
    os << buf;
  } else {
    os << j.dump();
  }
}

int usage() {
  std::cerr << "usage: mpopt-conformance optimizer CASE.json\n"
               "       mpopt-conformance scaler CASE.json\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return usage();
  const std::string mode = argv[1], path = argv[2];
  if (mode != "optimizer" && mode != "scaler") return usage();
  std::ifstream file(path);
  if (!file) {
    std::cerr << "mpopt-conformance: cannot open " << path << "\n";
    return 2;
  }
  try {
    const nlohmann::json in = nlohmann::json::parse(file);
    using namespace mpopt::conformance;
    const nlohmann::json out = mode == "optimizer" ? run_optimizer_case(in) : run_scaler_case(in);
    std::ostringstream os;
    write_json(os, out);
    std::cout << os.str() << "\n";
    return 0;
  } catch (const nlohmann::json::parse_error& e) {
    std::cerr << "mpopt-conformance: " << path << " is not valid JSON: " << e.what() << "\n";
  } catch (const mpopt::conformance::bad_input& e) {
    std::cerr << "mpopt-conformance: " << path << ": " << e.what() << "\n";
  } catch (const mpopt::error& e) {
    std::cerr << "mpopt-conformance: " << path << ": " << e.what() << "\n";
  }
  return 2;
}
