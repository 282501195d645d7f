#include "optimizer_case.hpp"

#include <cmath>
#include <set>

namespace mpopt::conformance {

double number_at(const nlohmann::json& j, const std::string& where) {
  if (!j.is_number()) throw bad_input(where + ": expected a number, got " + j.dump());
  return j.get<double>();
}

bool bool_at(const nlohmann::json& j, const std::string& where) {
  if (!j.is_boolean()) throw bad_input(where + ": expected true or false, got " + j.dump());
  return j.get<bool>();
}

void throw_if_bad(const status& s) {
  if (!s.ok()) throw bad_input(s.message);
}

namespace {

dtype dtype_at(const nlohmann::json& j, const std::string& where, bool allow_fp64) {
  if (j.is_string()) {
    const std::string s = j.get<std::string>();
    if (s == "fp32") return dtype::fp32;
    if (s == "fp16") return dtype::fp16;
    if (s == "bf16") return dtype::bf16;
    if (s == "fp64" && allow_fp64) return dtype::fp64;
  }
  throw bad_input(where + ": expected " + (allow_fp64 ? "\"fp32\" or \"fp64\"" : "\"fp32\", \"fp16\" or \"bf16\"") +
                  ", got " + j.dump());
}

std::vector<double> numbers_at(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) throw bad_input(where + ": expected a list of numbers, got " + j.dump());
  std::vector<double> v;
  v.reserve(j.size());
  for (std::size_t i = 0; i < j.size(); ++i) v.push_back(number_at(j[i], where + "[" + std::to_string(i) + "]"));
  return v;
}

optimizer_case parse(const nlohmann::json& in) {
  if (!in.is_object()) throw bad_input("case: expected a JSON object, got " + in.dump());
  static const std::set<std::string> known = {"optimizer", "dtype",     "hparams",      "w0",
                                              "grads",     "precision", "tensor_sizes", "max_grad_norm"};
  for (auto it = in.begin(); it != in.end(); ++it)
    if (!known.count(it.key())) throw bad_input(it.key() + ": unknown key in the case");
  for (const char* k : {"optimizer", "w0", "grads"})
    if (!in.contains(k)) throw bad_input(std::string(k) + ": missing");

  optimizer_case c;
  if (!in["optimizer"].is_string()) throw bad_input("optimizer: expected a string, got " + in["optimizer"].dump());
  c.optimizer = in["optimizer"].get<std::string>();
  const dtype d = in.contains("dtype") ? dtype_at(in["dtype"], "dtype", true) : dtype::fp32;
  c.param = c.master = c.grad = c.state = d;
  if (in.contains("precision")) {
    const auto& p = in["precision"];
    if (!p.is_object()) throw bad_input("precision: expected an object, got " + p.dump());
    if (d != dtype::fp32)
      throw bad_input("precision: requires \"dtype\": \"fp32\" (compute is fp32), got " + in["dtype"].dump());
    for (auto it = p.begin(); it != p.end(); ++it) {
      const std::string where = "precision." + it.key();
      if (it.key() == "param")
        c.param = dtype_at(it.value(), where, false);
      else if (it.key() == "master")
        c.master = dtype_at(it.value(), where, false);
      else if (it.key() == "grad")
        c.grad = dtype_at(it.value(), where, false);
      else if (it.key() == "state")
        c.state = dtype_at(it.value(), where, false);
      else
        throw bad_input(where + ": unknown role (param, master, grad, state)");
    }
  }
  if (in.contains("hparams")) {
    if (!in["hparams"].is_object()) throw bad_input("hparams: expected an object, got " + in["hparams"].dump());
    c.hparams = in["hparams"];
  }
  c.w0 = numbers_at(in["w0"], "w0");
  if (!in["grads"].is_array()) throw bad_input("grads: expected a list of lists, got " + in["grads"].dump());
  for (std::size_t s = 0; s < in["grads"].size(); ++s) {
    const std::string where = "grads[" + std::to_string(s) + "]";
    c.grads.push_back(numbers_at(in["grads"][s], where));
    if (c.grads.back().size() != c.w0.size())
      throw bad_input(where + ": has " + std::to_string(c.grads.back().size()) + " numbers, w0 has " +
                      std::to_string(c.w0.size()));
  }
  if (in.contains("tensor_sizes")) {
    std::size_t total = 0;
    for (double v : numbers_at(in["tensor_sizes"], "tensor_sizes")) {
      if (v < 0 || v != std::floor(v))
        throw bad_input("tensor_sizes: expected whole numbers >= 0, got " + std::to_string(v));
      c.tensor_sizes.push_back(std::size_t(v));
      total += std::size_t(v);
    }
    if (total != c.w0.size())
      throw bad_input("tensor_sizes: add up to " + std::to_string(total) + ", w0 has " + std::to_string(c.w0.size()));
  }
  if (in.contains("max_grad_norm")) c.max_grad_norm = number_at(in["max_grad_norm"], "max_grad_norm");
  return c;
}

}  // namespace

std::string unsupported_policy_message(const optimizer_case& c) {
  std::string why;
  if (c.state == dtype::fp16)
    why = "fp16 optimizer states are not supported; use state fp32 (or bf16 with a bf16 master)";
  else if (c.state == dtype::bf16 && c.master != dtype::bf16)
    why = "state bf16 requires master bf16";
  else if (c.master != c.param && c.master != dtype::fp32)
    why = "master must be the param dtype or fp32";
  else
    why = "not among the supported policies (README, 'Precision policies')";
  return std::string("precision {param: ") + dtype_name(c.param) + ", master: " + dtype_name(c.master) +
         ", grad: " + dtype_name(c.grad) + ", state: " + dtype_name(c.state) + "}: " + why;
}

nlohmann::json run_optimizer_case(const nlohmann::json& in, const zero_run& zero) {
  optimizer_case c = parse(in);
  if (zero.stage < 0 || zero.stage > 3)
    throw bad_input("--zero-stage: must be 0, 1, 2 or 3, got " + std::to_string(zero.stage));
  c.zero = zero;
  if (c.optimizer == "adam" || c.optimizer == "adamw") return run_adam(c);
  if (c.optimizer == "sgd") return run_sgd(c);
  if (c.optimizer == "adagrad") return run_adagrad(c);
  if (c.optimizer == "lamb") return run_lamb(c);
  if (c.optimizer == "lion") return run_lion(c);
  throw bad_input("optimizer: unknown \"" + c.optimizer + "\" (adam, adamw, sgd, adagrad, lamb, lion)");
}

}  // namespace mpopt::conformance
