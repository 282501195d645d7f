// DeepSpeed JSON configuration -> mpopt runtime configuration, with DeepSpeed's defaults and compatibility rules.
// Host only. Requires nlohmann/json (https://github.com/nlohmann/json, header <nlohmann/json.hpp>).
//
//   nlohmann::json j = nlohmann::json::parse(file);
//   mpopt::deepspeed::parse_result r = mpopt::deepspeed::parse_config(j);   // every error, every warning
//   if (!r.ok()) { for (auto& e : r.errors) std::cerr << e << "\n"; }
//   mpopt::deepspeed::config c = mpopt::deepspeed::load_config(j);          // or: throws mpopt::error
//
// Sections read: fp16, bf16 (legacy name bfloat16), zero_optimization, optimizer, gradient_clipping, amp,
// zero_allow_untested_optimizer, data_types, torch_autocast. Choices where DeepSpeed leaves room:
//  - Unknown keys inside fp16, bf16, data_types, torch_autocast and optimizer.params are errors (DeepSpeed's
//    pydantic models forbid extras; the optimizer constructor rejects unknown arguments). Unknown keys at the top
//    level and in zero_optimization are warnings: DeepSpeed has many keys outside an optimizer's scope.
//  - "auto" (the Hugging Face placeholder) means the default, as DeepSpeed drops such values.
//  - optimizer.params.max_grad_norm is an error pointing to gradient_clipping (DeepSpeed fails on it too, later).
//  - gradient_clipping defaults to 1.0 (DeepSpeed since 2026-06-23; 0.0 before).
//  - OneBitAdam, ZeroOneAdam, OneBitLamb: DeepSpeed's parameter names and defaults; accepted keys DeepSpeed ignores
//    (bias_correction, eps_inside_sqrt) warn when true; amsgrad true is an error. Without fp16 DeepSpeed warns that
//    convergence is only verified under fp16 and runs them: so does the importer, which records the opt-in that
//    mpopt::onebit::optimizer requires for such a precision (optimizer_config::accept_unverified_precision,
//    deepspeed::onebit_options_of). With ZeRO they are refused, as in DeepSpeed.
//  - data_types.grad_accum_dtype is the dtype micro-batch grads are summed in, and so the grad role of the optimizer's
//    precision policy (precision_config). mpopt accumulates in any dtype at any ZeRO stage; DeepSpeed refuses a
//    dtype other than the model's without ZeRO (a warning says so). The 1-bit optimizers take grads in the model dtype.
//  - Muon: DeepSpeed's MuonWithAuxAdam (read_optimizer_params has the keys, defaults and differences).
// deepspeed/dispatch.hpp maps a config onto the compiled optimizer types.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../numeric/traits.hpp"
#include "../rule/adagrad.hpp"
#include "../rule/adam.hpp"
#include "../rule/lamb.hpp"
#include "../rule/lion.hpp"
#include "../rule/muon.hpp"
#include "../rule/onebit.hpp"
#include "../rule/sgd.hpp"
#include "../scaler/loss_scaler.hpp"

namespace mpopt::deepspeed {

// The dtype of each role. param and grad are the model's dtype: grad is what backward produces per micro-batch.
// grad_accum is data_types.grad_accum_dtype (default: the model dtype): the caller sums the micro-batch grads into a
// buffer of this dtype (mpopt/grad_accumulation.hpp), which the optimizer reads, so it is the grad role of the
// optimizer's precision policy (optimizer_grad_dtype).
struct precision_config {
  dtype param = dtype::fp32;
  dtype master = dtype::fp32;
  dtype grad = dtype::fp32;
  dtype state = dtype::fp32;
  dtype grad_accum = dtype::fp32;
};

// The grad role of the optimizer's precision policy: the accumulation dtype, which the optimizer reads.
inline dtype optimizer_grad_dtype(const precision_config& p) noexcept {
  return p.grad_accum;
}

enum class scaler_kind : std::uint8_t { none, fixed, dynamic };  // no_scaler, static_scaler, dynamic_scaler

inline const char* to_string(scaler_kind k) {
  switch (k) {
    case scaler_kind::none: return "none";
    case scaler_kind::fixed: return "static";
    case scaler_kind::dynamic: return "dynamic";
  }
  return "?";
}

struct scaler_config {
  scaler_kind kind = scaler_kind::none;
  dynamic_scale_args dynamic{};  // kind == dynamic
  float loss_scale = 0.f;        // fp16.loss_scale as written: 0 = dynamic (when fp16 is enabled)
  float static_scale = 1.f;      // kind == fixed: fp16.loss_scale
  bool check_overflow = true;    // kind == none: skip steps with non-finite grads (bf16.check_grad_overflow)
};

struct offload_config {
  std::string device = "none";  // none, cpu, nvme
  bool pin_memory = true;
  double ratio = 1.0;
};

struct zero_config {
  int stage = 0;
  // DeepSpeed's values (elements), as written or defaulted.
  std::size_t reduce_bucket_size = 500000000;
  std::size_t allgather_bucket_size = 500000000;
  std::size_t stage3_max_live_parameters = 1000000000;
  // What mpopt uses for zero_options::bucket_elements: reduce_bucket_size when it is given, else mpopt's 1 M
  // (DeepSpeed's 5e8 makes OpenMPI's shared-memory reduce-scatter slow; see zero_options).
  std::size_t bucket_elements = std::size_t(1) << 20;
  offload_config offload_optimizer{};
};

// DeepSpeed's MuonWithAuxAdam defaults (runtime/zero/muon/original_muon.py). Matrices: lr 0.02, momentum 0.95,
// weight_decay 0, and what its muon_update fixes: Nesterov, 5 Newton-Schulz steps of the quintic (3.4445, -4.7750,
// 2.0315), lr scaled by sqrt(max(1, rows / cols)) (mpopt's adjust_lr original). eps stays mpopt's 1e-7: DeepSpeed
// divides by ||X|| + 1e-7, mpopt (as torch.optim.Muon) by max(||X||, 1e-7); the two differ only for ||X|| near 1e-7.
inline muon::args deepspeed_muon_defaults() {
  muon::args a;
  a.lr = 0.02;
  a.momentum = 0.95;
  a.nesterov = true;
  a.weight_decay = 0.0;
  a.ns_coefficients = muon::ns_coefficients_type{};
  a.ns_steps = 5;
  a.adjust_lr = muon_adjust_lr::original;
  return a;
}
// The other params' AdamW (adam_update: bias-corrected moments, decoupled decay): lr 3e-4, betas (0.9, 0.95), eps
// 1e-10, weight_decay 0.
inline adamw::args deepspeed_muon_aux_defaults() {
  adamw::args a;
  a.lr = 3e-4;
  a.beta1 = 0.9;
  a.beta2 = 0.95;
  a.eps = 1e-10;
  a.weight_decay = 0.0;
  a.bias_correction = true;
  a.amsgrad = false;
  return a;
}

// The optimizer section mapped onto mpopt's rules. `name` is the lower-cased DeepSpeed type: adam, adamw, sgd,
// adagrad, lamb, lion and muon are also the rules' names; onebitadam, zerooneadam and onebitlamb are the rules
// onebit_adam, zero_one_adam and onebit_lamb (rule_name()); "" when the config has no optimizer section (a client
// optimizer).
struct optimizer_config {
  std::string type;  // as written
  std::string name;
  adam::args adam_args{};  // adam and adamw (adam_w_mode tells which)
  sgd::args sgd_args{};
  adagrad::args adagrad_args{};
  lamb::args lamb_args{};
  lion::args lion_args{};
  onebit_adam::args onebit_adam_args{};
  zero_one_adam::args zero_one_adam_args{};
  onebit_lamb::args onebit_lamb_args{};
  // Muon: muon_args for the matrices (DeepSpeed's use_muon params), muon_aux_args for the AdamW on the others.
  // Which params are which is the caller's choice (mpopt::muon_group / the aux param_groups).
  muon::args muon_args = deepspeed_muon_defaults();
  adamw::args muon_aux_args = deepspeed_muon_aux_defaults();
  std::string ns_method = "gram";  // as written: "gram" (DeepSpeed's default) or "standard"; mpopt runs the standard
                                   // iteration for both (read_optimizer_params says why)
  bool torch_adam = false;
  // The 1-bit optimizers' transport, recorded as written (DeepSpeed's defaults): mpopt communicates through the
  // communicator given to mpopt::onebit::optimizer, whichever backend the config names.
  std::string comm_backend_name = "nccl";  // nccl, mpi, compressed or hccl
  bool cuda_aware = false;
  // 1-bit optimizers whose precision is not fp16 params and grads: DeepSpeed runs them with a warning (convergence
  // is only verified under fp16); mpopt's C++ API refuses them unless opted in (onebit::options::
  // accept_unverified_precision). The importer opts in, because the config asked for it, and the warning says so;
  // deepspeed::onebit_options_of() passes this on.
  bool accept_unverified_precision = false;
  nlohmann::json params = nlohmann::json::object();  // optimizer.params as written ("auto" values dropped)
};

struct torch_autocast_config {
  bool enabled = false;
  std::string dtype;  // "" when omitted (DeepSpeed then passes None: the device default, fp16 on CUDA)
  std::vector<std::string> lower_precision_safe_modules = {"torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d",
                                                           "torch.nn.Conv3d"};
};

struct config {
  bool fp16 = false;
  bool bf16 = false;
  bool fp16_master_weights_and_grads = false;
  bool bf16_master_weights_and_grads = false;
  bool bf16_optimizer_states = false;
  bool fp16_auto_cast = false;
  bool bf16_immediate_grad_update = false;
  bool amp = false;
  bool zero_allow_untested_optimizer = false;
  precision_config precision{};
  scaler_config scaler{};
  zero_config zero{};
  optimizer_config optimizer{};
  double gradient_clipping = 1.0;  // DeepSpeed's default since 2026-06-23 (0.0 before); <= 0 disables
  torch_autocast_config torch_autocast{};
  std::vector<std::string> warnings;
};

struct parse_result {
  config cfg;
  std::vector<std::string> errors;  // each names the key, the value and the fix; empty: cfg is valid
  bool ok() const noexcept { return errors.empty(); }
  // All errors, one a line; errc::invalid_argument.
  status to_status() const {
    if (errors.empty()) return status::success();
    std::string m;
    for (const auto& e : errors) m += (m.empty() ? "" : "\n") + e;
    return status::invalid(m);
  }
};

// DeepSpeed's ZERO_SUPPORTED_OPTIMIZERS as config names: the types DeepSpeed builds for these are on its list.
inline bool zero_tested_optimizer(const std::string& name) {
  return name == "adam" || name == "adamw" || name == "adagrad" || name == "lion" || name == "muon";
}
inline bool is_one_bit_optimizer(const std::string& name) {
  return name == "onebitadam" || name == "zerooneadam" || name == "onebitlamb";
}
// The mpopt rule's name (Rule::name) for an optimizer_config::name: the 1-bit ones differ, the others are the same.
inline std::string rule_name(const std::string& name) {
  if (name == "onebitadam") return onebit_adam::name;
  if (name == "zerooneadam") return zero_one_adam::name;
  if (name == "onebitlamb") return onebit_lamb::name;
  return name;
}

namespace detail {

using json = nlohmann::json;

inline std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
  return s;
}

inline std::string show(const json& j) {
  return j.dump();
}

inline std::string join(const std::string& path, const char* key) {
  return path.empty() ? key : path + "." + key;
}

inline std::string show(double v) {
  json j = v;
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) j = std::int64_t(v);
  return j.dump();
}

// Reads the keys of one section, collecting errors; values equal to "auto" count as absent.
class reader {
 public:
  reader(std::vector<std::string>& errors, std::vector<std::string>& warnings) : errors_(errors), warnings_(warnings) {}

  void error(std::string m) { errors_.push_back(std::move(m)); }
  void warn(std::string m) { warnings_.push_back(std::move(m)); }

  // The section `key` of `parent` (an object), or null when absent. An object is required.
  const json* section(const json& parent, const std::string& key, const std::string& path) {
    auto it = parent.find(key);
    if (it == parent.end() || it->is_null()) return nullptr;
    if (!it->is_object()) {
      error(path + ": must be an object, got " + show(*it));
      return nullptr;
    }
    return &*it;
  }

  const json* value(const json& obj, const char* key) {
    auto it = obj.find(key);
    if (it == obj.end() || (it->is_string() && it->get<std::string>() == "auto")) return nullptr;
    return &*it;
  }

  // A number: JSON numbers and numeric strings (pydantic's lax mode); not bool, not null.
  bool number(const json& obj, const char* key, const std::string& path, double& out) {
    const json* v = value(obj, key);
    if (!v) return false;
    if (v->is_number()) {
      out = v->get<double>();
      return true;
    }
    if (v->is_string()) {
      const std::string s = v->get<std::string>();
      char* end = nullptr;
      const double d = std::strtod(s.c_str(), &end);
      if (!s.empty() && end == s.c_str() + s.size()) {
        out = d;
        return true;
      }
    }
    error(join(path, key) + ": must be a number, got " + show(*v));
    return false;
  }

  bool finite_number(const json& obj, const char* key, const std::string& path, double& out) {
    double d = 0;
    if (!number(obj, key, path, d)) return false;
    if (!std::isfinite(d)) {
      error(join(path, key) + ": must be finite, got " + show(obj.at(key)));
      return false;
    }
    out = d;
    return true;
  }

  // An integer: 2.0 is accepted, 0.25 is not (DeepSpeed types these fields int).
  bool integer(const json& obj, const char* key, const std::string& path, std::int64_t& out) {
    double d = 0;
    if (!finite_number(obj, key, path, d)) return false;
    if (d != std::floor(d) || std::fabs(d) > 9.0e15) {
      error(join(path, key) + ": must be an integer, got " + show(obj.at(key)));
      return false;
    }
    out = std::int64_t(d);
    return true;
  }

  bool boolean(const json& obj, const char* key, const std::string& path, bool& out) {
    const json* v = value(obj, key);
    if (!v) return false;
    if (!v->is_boolean()) {
      error(join(path, key) + ": must be true or false, got " + show(*v));
      return false;
    }
    out = v->get<bool>();
    return true;
  }

  bool string(const json& obj, const char* key, const std::string& path, std::string& out) {
    const json* v = value(obj, key);
    if (!v) return false;
    if (!v->is_string()) {
      error(join(path, key) + ": must be a string, got " + show(*v));
      return false;
    }
    out = v->get<std::string>();
    return true;
  }

  bool size(const json& obj, const char* key, const std::string& path, std::size_t& out) {
    std::int64_t i = 0;
    if (!integer(obj, key, path, i)) return false;
    if (i <= 0) {
      error(join(path, key) + ": must be > 0, got " + show(obj.at(key)));
      return false;
    }
    out = std::size_t(i);
    return true;
  }

  // Unknown keys of a section: errors (strict) or warnings.
  void check_keys(const json& obj, const std::string& path, const std::set<std::string>& known, bool strict,
                  const std::set<std::string>& ignored = {}) {
    for (auto it = obj.begin(); it != obj.end(); ++it) {
      if (known.count(it.key()) || ignored.count(it.key())) continue;
      const std::string where = path.empty() ? it.key() : path + "." + it.key();
      if (strict)
        error(where + ": unknown key (remove it; DeepSpeed rejects it too)");
      else
        warn(where + ": unknown key, ignored");
    }
  }

 private:
  std::vector<std::string>& errors_;
  std::vector<std::string>& warnings_;
};

inline bool parse_dtype_name(const std::string& s, dtype& out) {
  const std::string l = lower(s);
  if (l == "fp32" || l == "float32" || l == "float" || l == "torch.float32" || l == "torch.float") {
    out = dtype::fp32;
  } else if (l == "fp16" || l == "float16" || l == "half" || l == "torch.float16" || l == "torch.half") {
    out = dtype::fp16;
  } else if (l == "bf16" || l == "bfloat16" || l == "torch.bfloat16") {
    out = dtype::bf16;
  } else {
    return false;
  }
  return true;
}

inline void read_fp16(reader& r, const json& s, config& c, bool& dynamic_fields_set) {
  const std::string p = "fp16";
  r.check_keys(s, p,
               {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
               true);
  r.boolean(s, "enabled", p, c.fp16);
  r.boolean(s, "auto_cast", p, c.fp16_auto_cast);
  r.boolean(s, "fp16_master_weights_and_grads", p, c.fp16_master_weights_and_grads);

  double loss_scale = 0;
  if (r.number(s, "loss_scale", p, loss_scale) && (!std::isfinite(loss_scale) || loss_scale < 0)) {
    r.error("fp16.loss_scale: must be finite and >= 0 (0 = dynamic scaling, > 0 = a static scale), got " +
            show(s.at("loss_scale")));
    loss_scale = 0;
  }
  dynamic_scale_args& d = c.scaler.dynamic;
  std::int64_t power = 16;
  if (r.integer(s, "initial_scale_power", p, power)) {
    if (power < -126 || power > 127) {
      r.error("fp16.initial_scale_power: the initial scale 2^p must be a finite float, p in [-126, 127], got " +
              std::to_string(power));
      power = 16;
    }
  }
  d.init_scale = std::ldexp(1.f, int(power));
  const bool dynamic = c.fp16 && loss_scale == 0;
  std::int64_t window = 1000;
  if (r.integer(s, "loss_scale_window", p, window) && window <= 0 && dynamic)
    r.error("fp16.loss_scale_window: must be > 0 under dynamic loss scaling (fp16.loss_scale 0), got " +
            std::to_string(window) + "; use e.g. 1000 (the default), or a static fp16.loss_scale");
  d.scale_window = window;
  std::int64_t hysteresis = 2;
  if (r.integer(s, "hysteresis", p, hysteresis)) {
    if (hysteresis < 0) {
      r.error("fp16.hysteresis: must be >= 0, got " + std::to_string(hysteresis));
      hysteresis = 2;
    }
  }
  d.hysteresis = std::int32_t(hysteresis);
  r.boolean(s, "consecutive_hysteresis", p, d.consecutive_hysteresis);
  // Settings FP16_Optimizer (no ZeRO) ignores: warned about there.
  dynamic_fields_set = (s.contains("hysteresis") && d.hysteresis != 1) || d.consecutive_hysteresis;
  std::int64_t min_scale = 1;
  if (r.integer(s, "min_loss_scale", p, min_scale) && min_scale <= 0 && dynamic)
    r.error("fp16.min_loss_scale: must be > 0 under dynamic loss scaling (fp16.loss_scale 0), got " +
            std::to_string(min_scale) + "; use e.g. 1 (the default), or a static fp16.loss_scale");
  d.min_scale = float(min_scale);
  c.scaler.loss_scale = float(loss_scale);
  if (loss_scale > 0) c.scaler.static_scale = float(loss_scale);
  c.scaler.kind = !c.fp16 ? scaler_kind::none : dynamic ? scaler_kind::dynamic : scaler_kind::fixed;
}

inline void read_bf16(reader& r, const json& s, const std::string& p, config& c) {
  r.check_keys(s, p,
               {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                "bf16_optimizer_states"},
               true);
  r.boolean(s, "enabled", p, c.bf16);
  r.boolean(s, "immediate_grad_update", p, c.bf16_immediate_grad_update);
  r.boolean(s, "check_grad_overflow", p, c.scaler.check_overflow);
  r.boolean(s, "bf16_master_weights_and_grads", p, c.bf16_master_weights_and_grads);
  r.boolean(s, "bf16_optimizer_states", p, c.bf16_optimizer_states);
}

inline void read_zero(reader& r, const json& s, config& c, bool& bucket_given) {
  const std::string p = "zero_optimization";
  // Keys DeepSpeed knows whose effect lies outside the optimizer step (overlap, prefetching, ...): no warning.
  static const std::set<std::string> ignored = {"contiguous_gradients",
                                                "overlap_comm",
                                                "reduce_scatter",
                                                "allgather_partitions",
                                                "offload_param",
                                                "sub_group_size",
                                                "stage3_prefetch_bucket_size",
                                                "stage3_param_persistence_threshold",
                                                "stage3_max_reuse_distance",
                                                "stage3_gather_16bit_weights_on_model_save",
                                                "stage3_gather_fp16_weights_on_model_save",
                                                "round_robin_gradients",
                                                "elastic_checkpoint",
                                                "load_from_fp32_weights",
                                                "ignore_unused_parameters",
                                                "legacy_stage1",
                                                "use_multi_rank_bucket_allreduce",
                                                "zero_hpz_partition_size",
                                                "zero_quantized_weights",
                                                "zero_quantized_gradients",
                                                "memory_efficient_linear",
                                                "mics_shard_size",
                                                "mics_hierarchical_params_gather",
                                                "save_muon_momentum_buffer_in_memory"};
  r.check_keys(s, p,
               {"stage", "reduce_bucket_size", "allgather_bucket_size", "stage3_max_live_parameters",
                "offload_optimizer", "cpu_offload"},
               false, ignored);
  std::int64_t stage = 0;
  if (r.integer(s, "stage", p, stage)) {
    if (stage < 0 || stage > 3) {
      r.error("zero_optimization.stage: must be 0, 1, 2 or 3, got " + std::to_string(stage));
      stage = 0;
    }
  }
  c.zero.stage = int(stage);
  bucket_given = r.size(s, "reduce_bucket_size", p, c.zero.reduce_bucket_size);
  r.size(s, "allgather_bucket_size", p, c.zero.allgather_bucket_size);
  r.size(s, "stage3_max_live_parameters", p, c.zero.stage3_max_live_parameters);
  bool cpu_offload = false;
  if (r.boolean(s, "cpu_offload", p, cpu_offload)) {
    r.warn("zero_optimization.cpu_offload: deprecated; use \"offload_optimizer\": {\"device\": \"cpu\"}");
    if (cpu_offload) c.zero.offload_optimizer.device = "cpu";
  }
  if (const json* o = r.section(s, "offload_optimizer", p + ".offload_optimizer")) {
    const std::string q = p + ".offload_optimizer";
    r.check_keys(*o, q, {"device", "pin_memory", "ratio"}, false,
                 {"nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "fast_init", "pipeline_read",
                  "pipeline_write", "pipeline"});
    std::string dev;
    if (r.string(*o, "device", q, dev)) {
      if (dev != "none" && dev != "cpu" && dev != "nvme")
        r.error(q + ".device: must be \"none\", \"cpu\" or \"nvme\", got \"" + dev + "\"");
      else
        c.zero.offload_optimizer.device = dev;
    }
    r.boolean(*o, "pin_memory", q, c.zero.offload_optimizer.pin_memory);
    double ratio = 1.0;
    if (r.finite_number(*o, "ratio", q, ratio)) {
      if (ratio <= 0 || ratio > 1)
        r.error(q + ".ratio: must be in (0, 1], got " + show(o->at("ratio")));
      else
        c.zero.offload_optimizer.ratio = ratio;
    }
  }
}

// optimizer.params -> the rule's args; unknown parameters are errors (the constructor would reject them).
inline void read_optimizer_params(reader& r, const json& params, config& c) {
  optimizer_config& o = c.optimizer;
  const std::string p = "optimizer.params";
  auto betas = [&](double& b1, double& b2) {
    const json* v = r.value(params, "betas");
    if (!v) return;
    if (!v->is_array() || v->size() != 2 || !(*v)[0].is_number() || !(*v)[1].is_number()) {
      r.error(p + ".betas: must be a list of two numbers, e.g. [0.9, 0.999], got " + show(*v));
      return;
    }
    b1 = (*v)[0].get<double>();
    b2 = (*v)[1].get<double>();
  };
  auto num = [&](const char* key, double& out) { r.finite_number(params, key, p, out); };
  std::set<std::string> known;
  const std::string& n = o.name;
  if (n == "adam" || n == "adamw") {
    known = {"lr", "betas", "eps", "weight_decay", "bias_correction", "amsgrad", "adam_w_mode", "torch_adam"};
    adam::args& a = o.adam_args;
    a = adam::args{};
    a.adam_w_mode = true;  // DeepSpeed: "Adam" means decoupled decay unless adam_w_mode is false
    r.boolean(params, "torch_adam", p, o.torch_adam);
    // FusedAdam's weight_decay default is 0; torch.optim.AdamW's (torch_adam) is 0.01.
    a.weight_decay = (n == "adamw" && o.torch_adam) ? 1e-2 : 0.0;
    num("lr", a.lr);
    betas(a.beta1, a.beta2);
    num("eps", a.eps);
    num("weight_decay", a.weight_decay);
    r.boolean(params, "bias_correction", p, a.bias_correction);
    r.boolean(params, "amsgrad", p, a.amsgrad);
    if (n == "adamw") {
      bool mode = true;
      if (r.boolean(params, "adam_w_mode", p, mode) && !mode)
        r.warn("optimizer.params.adam_w_mode: false is ignored for AdamW (DeepSpeed forces decoupled decay)");
    } else {
      r.boolean(params, "adam_w_mode", p, a.adam_w_mode);
    }
    o.name = a.adam_w_mode ? "adamw" : "adam";
  } else if (n == "sgd") {  // torch.optim.SGD
    known = {"lr", "momentum", "dampening", "weight_decay", "nesterov"};
    num("lr", o.sgd_args.lr);
    num("momentum", o.sgd_args.momentum);
    num("dampening", o.sgd_args.dampening);
    num("weight_decay", o.sgd_args.weight_decay);
    r.boolean(params, "nesterov", p, o.sgd_args.nesterov);
  } else if (n == "adagrad") {  // torch.optim.Adagrad / DeepSpeedCPUAdagrad
    known = {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"};
    num("lr", o.adagrad_args.lr);
    num("lr_decay", o.adagrad_args.lr_decay);
    num("weight_decay", o.adagrad_args.weight_decay);
    num("initial_accumulator_value", o.adagrad_args.initial_accumulator_value);
    num("eps", o.adagrad_args.eps);
  } else if (n == "lamb") {  // FusedLamb
    known = {"lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff"};
    o.lamb_args.eps = 1e-8;  // FusedLamb's default (mpopt::lamb's own is 1e-6)
    num("lr", o.lamb_args.lr);
    betas(o.lamb_args.beta1, o.lamb_args.beta2);
    num("eps", o.lamb_args.eps);
    num("weight_decay", o.lamb_args.weight_decay);
    r.boolean(params, "bias_correction", p, o.lamb_args.bias_correction);
    num("max_coeff", o.lamb_args.max_coeff);
    num("min_coeff", o.lamb_args.min_coeff);
  } else if (n == "lion") {  // FusedLion / DeepSpeedCPULion
    known = {"lr", "betas", "weight_decay"};
    o.lion_args.lr = 1e-3;  // FusedLion's default (mpopt::lion's own is 1e-4, the paper's)
    num("lr", o.lion_args.lr);
    betas(o.lion_args.beta1, o.lion_args.beta2);
    num("weight_decay", o.lion_args.weight_decay);
  } else if (is_one_bit_optimizer(n)) {  // OnebitAdam, ZeroOneAdam, OnebitLamb (runtime/fp16/onebit)
    known = {"lr",           "betas",           "eps",
             "weight_decay", "bias_correction", "eps_inside_sqrt",
             "amsgrad",      "cuda_aware",      "comm_backend_name"};
    auto common = [&](auto& a) {
      num("lr", a.lr);
      betas(a.beta1, a.beta2);
      num("eps", a.eps);
      num("weight_decay", a.weight_decay);
    };
    auto steps = [&](const char* key, std::int64_t& out) {
      known.insert(key);
      r.integer(params, key, p, out);
    };
    auto real = [&](const char* key, double& out) {
      known.insert(key);
      num(key, out);
    };
    if (n == "onebitadam") {
      onebit_adam::args& a = o.onebit_adam_args;
      a = onebit_adam::args{};
      common(a);
      steps("freeze_step", a.freeze_step);
    } else if (n == "zerooneadam") {
      zero_one_adam::args& a = o.zero_one_adam_args;
      a = zero_one_adam::args{};
      common(a);
      steps("var_freeze_step", a.var_freeze_step);
      steps("var_update_scaler", a.var_update_scaler);
      steps("local_step_scaler", a.local_step_scaler);
      steps("local_step_clipper", a.local_step_clipper);
    } else {
      onebit_lamb::args& a = o.onebit_lamb_args;
      a = onebit_lamb::args{};
      common(a);
      steps("freeze_step", a.freeze_step);
      real("max_coeff", a.max_coeff);
      real("min_coeff", a.min_coeff);
      real("coeff_beta", a.coeff_beta);
      real("factor_max", a.factor_max);
      real("factor_min", a.factor_min);
      real("factor_threshold", a.factor_threshold);
    }
    // Accepted by DeepSpeed's constructors but without effect there: ignored here too, with a word when set.
    bool flag = false;
    if (r.boolean(params, "bias_correction", p, flag) && flag)
      r.warn(
          "optimizer.params.bias_correction: true is ignored; the 1-bit optimizers never apply bias correction "
          "(DeepSpeed accepts the key and ignores it too)");
    if (r.boolean(params, "eps_inside_sqrt", p, flag) && flag)
      r.warn(
          "optimizer.params.eps_inside_sqrt: true is ignored; eps is added outside the square root (DeepSpeed "
          "stores the key and ignores it too)");
    if (r.boolean(params, "amsgrad", p, flag) && flag)
      r.error("optimizer.params.amsgrad: true is not supported by optimizer \"" + o.type +
              "\" (DeepSpeed raises too); remove it or set it to false");
    r.boolean(params, "cuda_aware", p, o.cuda_aware);
    o.comm_backend_name = "nccl";
    std::string backend;
    if (r.string(params, "comm_backend_name", p, backend)) {
      if (backend != "nccl" && backend != "mpi" && backend != "compressed" && backend != "hccl")
        r.error("optimizer.params.comm_backend_name: must be \"nccl\", \"mpi\", \"compressed\" or \"hccl\", got \"" +
                backend + "\"");
      else
        o.comm_backend_name = backend;
    }
  } else {  // Muon: the keys engine.py passes to MuonWithAuxAdam; it drops any other key silently, mpopt refuses it
    known = {"lr", "muon_lr", "momentum", "weight_decay", "ns_method", "adam_lr", "betas", "eps"};
    muon::args& m = o.muon_args;
    adamw::args& a = o.muon_aux_args;
    m = deepspeed_muon_defaults();
    a = deepspeed_muon_aux_defaults();
    double shared = 0;  // lr and weight_decay go to both kinds of group
    if (r.finite_number(params, "lr", p, shared)) m.lr = a.lr = shared;
    if (r.finite_number(params, "weight_decay", p, shared)) m.weight_decay = a.weight_decay = shared;
    num("muon_lr", m.lr);  // override lr for the matrices
    num("adam_lr", a.lr);  // and for the others
    num("momentum", m.momentum);
    betas(a.beta1, a.beta2);
    num("eps", a.eps);
    // "gram" iterates on X Xᵀ and is the standard iteration reordered, equal in exact arithmetic; mpopt runs the
    // standard one for both names. No warning: the difference is rounding, smaller than that of the GEMM precision
    // (DeepSpeed's GPUs run gram in fp16 and standard in bf16; mpopt's is muon_optimizer's Gemm), and DeepSpeed
    // itself runs the standard iteration for square matrices. The name is recorded and printed.
    o.ns_method = "gram";
    std::string ns;
    if (r.string(params, "ns_method", p, ns)) {
      if (ns != "gram" && ns != "standard")
        r.error(p + ".ns_method: must be \"gram\" or \"standard\", got \"" + ns + "\"");
      else
        o.ns_method = ns;
    }
  }
  for (auto it = params.begin(); it != params.end(); ++it) {
    if (known.count(it.key()) || it.key() == "max_grad_norm") continue;
    r.error(p + "." + it.key() + ": unknown parameter for optimizer \"" + o.type + "\" (known: " +
            [&] {
              std::string k;
              for (const auto& s : known) k += (k.empty() ? "" : ", ") + s;
              return k;
            }() +
            ")" + (n == "muon" ? "; DeepSpeed passes only these to MuonWithAuxAdam and drops the rest silently" : ""));
  }
}

inline void read_optimizer(reader& r, const json& s, config& c) {
  r.check_keys(s, "optimizer", {"type", "params", "legacy_fusion"}, true);
  optimizer_config& o = c.optimizer;
  if (!r.string(s, "type", "optimizer", o.type)) {
    r.error("optimizer.type: missing; set e.g. \"type\": \"AdamW\", or remove the optimizer section");
    return;
  }
  static const std::set<std::string> names = {"adam", "adamw",      "sgd",         "adagrad",    "lamb",
                                              "lion", "onebitadam", "zerooneadam", "onebitlamb", "muon"};
  const std::string n = lower(o.type);
  if (!names.count(n)) {
    r.error("optimizer.type: unknown optimizer \"" + o.type +
            "\"; mpopt reads Adam, AdamW, SGD, Adagrad, Lamb, Lion, OneBitAdam, ZeroOneAdam, OneBitLamb, Muon");
    return;
  }
  o.name = n;
  json params = json::object();
  if (const json* ps = r.section(s, "params", "optimizer.params")) {
    for (auto it = ps->begin(); it != ps->end(); ++it)
      if (!(it->is_string() && it->get<std::string>() == "auto")) params[it.key()] = *it;
  }
  o.params = params;
  if (params.contains("max_grad_norm"))
    r.error("optimizer.params.max_grad_norm: not accepted (got " + show(params["max_grad_norm"]) +
            "); set the top-level \"gradient_clipping\": " + show(params["max_grad_norm"]) +
            " instead (DeepSpeed also rejects it when it builds the optimizer)");
  read_optimizer_params(r, params, c);
}

inline void read_torch_autocast(reader& r, const json& s, config& c) {
  const std::string p = "torch_autocast";
  r.check_keys(s, p, {"enabled", "dtype", "lower_precision_safe_modules"}, true);
  torch_autocast_config& t = c.torch_autocast;
  r.boolean(s, "enabled", p, t.enabled);
  std::string name;
  if (r.string(s, "dtype", p, name)) {
    dtype d{};
    if (!parse_dtype_name(name, d) || d == dtype::fp32)
      r.error(
          "torch_autocast.dtype: must be a 16-bit type (\"bfloat16\", \"bf16\", \"float16\", \"fp16\", "
          "\"half\", ...), got \"" +
          name + "\"");
    else
      t.dtype = dtype_name(d);
  }
  if (const json* m = r.value(s, "lower_precision_safe_modules")) {
    if (!m->is_array()) {
      r.error("torch_autocast.lower_precision_safe_modules: must be a list of class names, got " + show(*m));
    } else {
      t.lower_precision_safe_modules.clear();
      for (const json& e : *m) {
        if (!e.is_string())
          r.error("torch_autocast.lower_precision_safe_modules: entries must be strings, got " + show(e));
        else
          t.lower_precision_safe_modules.push_back(e.get<std::string>());
      }
    }
  }
  if (t.enabled && t.dtype.empty())
    r.warn(
        "torch_autocast.dtype: not set; DeepSpeed then autocasts to the device default (fp16 on CUDA), not the "
        "documented bfloat16. Set it explicitly");
}

// A 1-bit or Muon rule's validate() message "<rule>.<field> must be ..., got v" as "optimizer.params.<key>: must be
// ..., got <the value as written>": the DeepSpeed key (beta1/beta2 are betas[0]/betas[1], lr is lr_key) and its
// value, or "(the default)".
inline std::string param_error(const std::string& rule, const std::string& message, const json& params,
                               const std::string& lr_key = "lr") {
  const std::string prefix = rule + ".";
  const std::size_t space = message.find(' ');
  if (message.compare(0, prefix.size(), prefix) != 0 || space == std::string::npos)
    return "optimizer.params: " + message;
  const std::string field = message.substr(prefix.size(), space - prefix.size());
  std::string what = message.substr(space);  // " must be ..., got v"
  const bool beta = field == "beta1" || field == "beta2";
  const std::string key = beta ? "betas" : field == "lr" ? lr_key : field;
  const json* written = nullptr;
  if (params.contains(key)) {
    written = &params.at(key);
    if (beta) written = written->is_array() && written->size() == 2 ? &(*written)[field == "beta1" ? 0 : 1] : nullptr;
  }
  const std::size_t got = what.rfind(", got ");
  if (written && got != std::string::npos)
    what = what.substr(0, got) + ", got " + show(*written);
  else if (!written)
    what += " (the default)";
  return "optimizer.params." + key + (beta ? (field == "beta1" ? "[0]" : "[1]") : "") + ":" + what;
}

// The cross-section rules (DeepSpeed config.py, engine.py sanity checks, base_optimizer master-weight checks).
inline void check_rules(reader& r, config& c, bool dynamic_fields_set) {
  const int stage = c.zero.stage;
  const std::string& n = c.optimizer.name;
  if (c.fp16 && c.bf16)
    r.error("fp16.enabled and bf16.enabled: both true; DeepSpeed cannot run both modes. Set one of them to false");
  if (c.amp) {
    if (stage > 0)
      r.error("amp.enabled: AMP is not compatible with zero_optimization.stage " + std::to_string(stage) +
              "; use \"fp16\": {\"enabled\": true} instead (DeepSpeed's native fp16 replaces AMP O2), or ZeRO stage 0");
    else
      r.error(
          "amp.enabled: apex AMP is not supported by mpopt; use \"fp16\": {\"enabled\": true} (fp16 params with "
          "an fp32 master and dynamic loss scaling, what AMP O2 does)");
  }
  if (stage > 0 && !n.empty() && !zero_tested_optimizer(n) && !is_one_bit_optimizer(n)) {
    if (c.zero_allow_untested_optimizer)
      r.warn("optimizer.type: \"" + c.optimizer.type +
             "\" is not in DeepSpeed's tested ZeRO optimizers (Adam, AdamW, "
             "Adagrad, Lion, Muon); running it with zero_optimization.stage " +
             std::to_string(stage) + " because zero_allow_untested_optimizer is true");
    else
      r.error("optimizer.type: \"" + c.optimizer.type +
              "\" is not in DeepSpeed's tested ZeRO optimizers (Adam, AdamW, "
              "Adagrad, Lion, Muon) at zero_optimization.stage " +
              std::to_string(stage) + "; set \"zero_allow_untested_optimizer\": true to run it anyway");
  }
  if (is_one_bit_optimizer(n)) {
    if (stage > 0)
      r.error("optimizer.type: \"" + c.optimizer.type + "\" is not compatible with ZeRO (zero_optimization.stage " +
              std::to_string(stage) + "); use zero_optimization.stage 0");
    // DeepSpeed warns and runs; mpopt's C++ API refuses unless opted in, and the importer opts in (see
    // optimizer_config::accept_unverified_precision).
    const bool verified = c.precision.param == dtype::fp16 && c.precision.grad == dtype::fp16;
    c.optimizer.accept_unverified_precision = !verified;
    if (!verified)
      r.warn("optimizer.type: the convergence of 1-bit Adam / 0/1 Adam / 1-bit Lamb (\"" + c.optimizer.type +
             "\") is only verified under fp16; consider \"fp16\": {\"enabled\": true}. Running it in " +
             dtype_name(c.precision.param) +
             " as DeepSpeed does: the importer opts in for you (deepspeed::onebit_options_of() sets "
             "onebit::options::accept_unverified_precision, without which mpopt::onebit::optimizer refuses this "
             "precision)");
  }
  // A grad_accum_dtype other than the model dtype: the optimizer's grads are the accumulation buffer, in that dtype.
  const precision_config& p = c.precision;
  if (p.grad_accum != p.grad) {
    const std::string key = std::string("data_types.grad_accum_dtype: ") + dtype_name(p.grad_accum);
    if (is_one_bit_optimizer(n))
      r.error(key + " differs from the model dtype " + dtype_name(p.grad) + "; optimizer \"" + c.optimizer.type +
              "\" takes its grads in the model dtype (mpopt::onebit::optimizer has no separate accumulation dtype). "
              "Remove data_types.grad_accum_dtype, or set it to \"" +
              dtype_name(p.grad) + "\"");
    else if (stage == 0)
      r.warn(key + " with a " + dtype_name(p.grad) +
             " model at zero_optimization.stage 0: DeepSpeed refuses this mix without ZeRO (NotImplementedError); "
             "mpopt accumulates in any dtype at any stage (sum the micro-batch grads into a " +
             dtype_name(p.grad_accum) + " buffer, mpopt/grad_accumulation.hpp)");
  }
  if (n == "muon" && (stage == 0 || (stage == 1 && c.bf16 && p.grad_accum == dtype::fp32 &&
                                     c.zero.offload_optimizer.device == "none")))
    r.warn(std::string("optimizer.type: \"") + c.optimizer.type + "\" at zero_optimization.stage " +
           std::to_string(stage) + (stage == 1 ? " with bf16 and data_types.grad_accum_dtype fp32" : "") +
           ": DeepSpeed applies the Muon update only inside its ZeRO optimizer (not " +
           (stage == 1 ? "BF16_Optimizer, which it picks here" : "without ZeRO") +
           "), so its MuonWithAuxAdam steps the matrices with their raw gradients (no momentum, no Newton-Schulz). "
           "mpopt runs Muon; use zero_optimization.stage 2 to compare with DeepSpeed");
  if ((n == "lamb" || n == "onebitlamb") && c.scaler.loss_scale != 0)
    r.error("fp16.loss_scale: optimizer \"" + c.optimizer.type + "\" requires dynamic loss scaling; set " +
            "fp16.loss_scale to 0, got " + show(double(c.scaler.loss_scale)));
  // Master-weight modes (DeepSpeed #7700).
  if (c.fp16_master_weights_and_grads && c.bf16_master_weights_and_grads)
    r.error(
        "fp16.fp16_master_weights_and_grads and bf16.bf16_master_weights_and_grads: both true; they are mutually "
        "exclusive, set one to false");
  if (c.bf16_optimizer_states && !c.bf16_master_weights_and_grads)
    r.error(
        "bf16.bf16_optimizer_states: requires bf16.bf16_master_weights_and_grads to be enabled (bf16 states "
        "follow a bf16 master); set it true, or bf16_optimizer_states false");
  const char* stage0 = " is only supported with ZeRO stage 1, 2 or 3; set zero_optimization.stage, or the flag false";
  if (stage == 0) {
    if (c.fp16_master_weights_and_grads) r.error(std::string("fp16.fp16_master_weights_and_grads: true") + stage0);
    if (c.bf16_master_weights_and_grads) r.error(std::string("bf16.bf16_master_weights_and_grads: true") + stage0);
    if (c.bf16_optimizer_states) r.error(std::string("bf16.bf16_optimizer_states: true") + stage0);
  }
  if (c.fp16_master_weights_and_grads && !c.fp16)
    r.error("fp16.fp16_master_weights_and_grads: requires fp16.enabled true (an fp16 master needs fp16 params)");
  if (c.bf16_master_weights_and_grads && !c.bf16)
    r.error("bf16.bf16_master_weights_and_grads: requires bf16.enabled true (a bf16 master needs bf16 params)");
  const bool offloaded = c.zero.offload_optimizer.device != "none";
  if ((c.fp16_master_weights_and_grads || (c.bf16_master_weights_and_grads && !c.bf16_optimizer_states)) && !offloaded)
    r.warn(std::string(c.fp16_master_weights_and_grads ? "fp16.fp16_master_weights_and_grads"
                                                       : "bf16.bf16_master_weights_and_grads") +
           ": DeepSpeed requires offload_optimizer.device cpu with DeepSpeedCPUAdam for this mode; mpopt runs it "
           "with fp32 optimizer states without offload");
  if (c.zero.offload_optimizer.ratio < 1 && stage != 3)
    r.error("zero_optimization.offload_optimizer.ratio: partial offload (" + show(c.zero.offload_optimizer.ratio) +
            ") needs zero_optimization.stage 3, got stage " + std::to_string(stage));
  if (c.fp16 && c.scaler.kind == scaler_kind::dynamic && stage == 0 && dynamic_fields_set)
    r.warn(
        "fp16.hysteresis / fp16.consecutive_hysteresis: ignored without ZeRO (DeepSpeed's FP16_Optimizer backs "
        "off on every overflow); effective hysteresis 1");
  if (c.gradient_clipping < 0)
    r.error("gradient_clipping: must be >= 0 (0 disables clipping), got " + show(c.gradient_clipping));
}

}  // namespace detail

// Reads and validates a DeepSpeed config. Never throws for bad input: the errors are listed in the result.
inline parse_result parse_config(const nlohmann::json& j) {
  using detail::json;
  parse_result res;
  config& c = res.cfg;
  detail::reader r(res.errors, c.warnings);
  if (!j.is_object()) {
    r.error("the DeepSpeed config must be a JSON object, got " + detail::show(j));
    return res;
  }
  // Top-level keys DeepSpeed knows that do not concern the optimizer step: accepted silently.
  static const std::set<std::string> ignored = {"train_batch_size",
                                                "train_micro_batch_size_per_gpu",
                                                "gradient_accumulation_steps",
                                                "steps_per_print",
                                                "wall_clock_breakdown",
                                                "scheduler",
                                                "communication_data_type",
                                                "prescale_gradients",
                                                "gradient_predivide_factor",
                                                "sparse_gradients",
                                                "zero_force_ds_cpu_optimizer",
                                                "gradient_allreduce_op",
                                                "seq_parallel_communication_data_type",
                                                "dump_state",
                                                "activation_checkpointing",
                                                "flops_profiler",
                                                "tensorboard",
                                                "wandb",
                                                "csv_monitor",
                                                "comms_logger",
                                                "checkpoint",
                                                "aio",
                                                "elasticity",
                                                "memory_breakdown",
                                                "pipeline",
                                                "compression_training",
                                                "data_efficiency",
                                                "autotuning",
                                                "disable_allgather",
                                                "sparse_attention",
                                                "curriculum_learning",
                                                "quantize_training"};
  r.check_keys(j, "",
               {"fp16", "bf16", "bfloat16", "zero_optimization", "optimizer", "gradient_clipping", "amp",
                "zero_allow_untested_optimizer", "data_types", "torch_autocast"},
               false, ignored);

  bool dynamic_fields_set = false;
  if (const json* s = r.section(j, "fp16", "fp16")) detail::read_fp16(r, *s, c, dynamic_fields_set);
  if (j.contains("bf16") && j.contains("bfloat16"))
    r.error("bfloat16: the legacy name of the bf16 section; give only \"bf16\"");
  if (const json* s = r.section(j, "bf16", "bf16")) detail::read_bf16(r, *s, "bf16", c);
  if (const json* s = r.section(j, "bfloat16", "bfloat16")) detail::read_bf16(r, *s, "bfloat16", c);
  bool bucket_given = false;
  if (const json* s = r.section(j, "zero_optimization", "zero_optimization")) detail::read_zero(r, *s, c, bucket_given);
  if (bucket_given) c.zero.bucket_elements = c.zero.reduce_bucket_size;
  if (const json* s = r.section(j, "amp", "amp")) r.boolean(*s, "enabled", "amp", c.amp);  // other keys go to apex
  r.boolean(j, "zero_allow_untested_optimizer", "", c.zero_allow_untested_optimizer);
  {
    double clip = 1.0;
    if (r.finite_number(j, "gradient_clipping", "", clip)) c.gradient_clipping = clip;
  }
  if (const json* s = r.section(j, "torch_autocast", "torch_autocast")) detail::read_torch_autocast(r, *s, c);

  // Precision roles.
  const dtype model = c.fp16 ? dtype::fp16 : c.bf16 ? dtype::bf16 : dtype::fp32;
  precision_config& p = c.precision;
  p.param = p.grad = p.grad_accum = model;
  p.master = c.fp16_master_weights_and_grads   ? dtype::fp16
             : c.bf16_master_weights_and_grads ? dtype::bf16
                                               : dtype::fp32;
  p.state = c.bf16_optimizer_states ? dtype::bf16 : dtype::fp32;
  if (const json* s = r.section(j, "data_types", "data_types")) {
    r.check_keys(*s, "data_types", {"grad_accum_dtype", "param_dtype", "buffer_dtype"}, true);
    for (const char* key : {"grad_accum_dtype", "param_dtype", "buffer_dtype"}) {
      std::string name;
      if (!r.string(*s, key, "data_types", name)) continue;
      dtype d{};
      if (!detail::parse_dtype_name(name, d)) {
        r.error(std::string("data_types.") + key + ": must be \"fp32\", \"fp16\" or \"bf16\", got \"" + name + "\"");
        continue;
      }
      if (std::string(key) == "grad_accum_dtype") {
        p.grad_accum = d;  // checked against the optimizer in check_rules
      } else if (std::string(key) == "param_dtype" && d != model) {
        r.error(std::string("data_types.param_dtype: \"") + name + "\" conflicts with the model dtype " +
                dtype_name(model) + " set by fp16/bf16.enabled; remove it or make it " + dtype_name(model));
      }
    }
  }

  if (const json* s = r.section(j, "optimizer", "optimizer")) detail::read_optimizer(r, *s, c);

  // The scaler: DeepSpeed's ZeRO DynamicLossScaler, or without ZeRO FP16_Optimizer's inline update (no hysteresis,
  // clamps at the minimum instead of raising).
  if (c.scaler.kind == scaler_kind::dynamic && c.zero.stage == 0) {
    c.scaler.dynamic.hysteresis = 1;
    c.scaler.dynamic.consecutive_hysteresis = false;
    c.scaler.dynamic.error_at_min = false;
  }
  detail::check_rules(r, c, dynamic_fields_set);

  // The library's own checks, for what the key rules above did not cover (e.g. initial scale below the minimum).
  if (res.errors.empty()) {
    if (c.scaler.kind == scaler_kind::dynamic) {
      const status s = validate(c.scaler.dynamic);
      if (!s.ok()) r.error("fp16: " + s.message);
    }
    const optimizer_config& o = c.optimizer;
    status s;
    if (o.name == "adam" || o.name == "adamw")
      s = adam::validate(o.adam_args);
    else if (o.name == "sgd")
      s = sgd::validate(o.sgd_args);
    else if (o.name == "adagrad")
      s = adagrad::validate(o.adagrad_args);
    else if (o.name == "lamb")
      s = lamb::validate(o.lamb_args);
    else if (o.name == "lion")
      s = lion::validate(o.lion_args);
    if (!s.ok()) r.error("optimizer.params: " + s.message);
    // The 1-bit rules: the error names the DeepSpeed key and its value as written.
    if (o.name == "onebitadam")
      s = onebit_adam::validate(o.onebit_adam_args);
    else if (o.name == "zerooneadam")
      s = zero_one_adam::validate(o.zero_one_adam_args);
    else if (o.name == "onebitlamb")
      s = onebit_lamb::validate(o.onebit_lamb_args);
    if (is_one_bit_optimizer(o.name) && !s.ok()) r.error(detail::param_error(rule_name(o.name), s.message, o.params));
    if (o.name == "muon") {  // each kind of group's lr comes from muon_lr / adam_lr when given, else from lr
      const status sm = muon::validate(o.muon_args);
      const status sa = adamw::validate(o.muon_aux_args);
      const std::string em = sm.ok() ? ""
                                     : detail::param_error(muon::name, sm.message, o.params,
                                                           o.params.contains("muon_lr") ? "muon_lr" : "lr");
      const std::string ea = sa.ok() ? ""
                                     : detail::param_error(adam::name, sa.message, o.params,
                                                           o.params.contains("adam_lr") ? "adam_lr" : "lr");
      if (!em.empty()) r.error(em);
      if (!ea.empty() && ea != em) r.error(ea);  // a shared key (lr, weight_decay) once
    }
    const onebit_lamb::args& l = o.onebit_lamb_args;
    const double window = 1.0 / (1.0 - l.coeff_beta);  // the EMA's horizon, in steps
    if (o.name == "onebitlamb" && s.ok() && window > double(l.freeze_step) * (1.0 + 1e-12))
      r.warn("optimizer.params.coeff_beta: 1 / (1 - coeff_beta) = " + detail::show(std::round(window * 1e6) / 1e6) +
             " exceeds freeze_step " + std::to_string(l.freeze_step) +
             "; the trust-ratio average frozen at freeze_step is then biased towards 0 (DeepSpeed's tutorial: keep "
             "it <= freeze_step)");
  }
  return res;
}

// parse_config, throwing mpopt::error (all errors, one a line) when the config is invalid.
inline config load_config(const nlohmann::json& j) {
  parse_result r = parse_config(j);
  throw_if_error(r.to_status());
  return std::move(r.cfg);
}

// The resolved configuration: every setting with its effective value.
inline nlohmann::json to_json(const config& c) {
  using detail::json;
  json j;
  const precision_config& p = c.precision;
  j["precision"] = {{"param", dtype_name(p.param)},
                    {"master", dtype_name(p.master)},
                    {"grad", dtype_name(p.grad)},
                    {"state", dtype_name(p.state)},
                    {"grad_accum", dtype_name(p.grad_accum)}};
  // The two grad dtypes side by side: backward's, and the buffer the micro-batches are summed into, which is the
  // grad<> of the optimizer's precision policy.
  j["grad_accumulation"] = {{"micro_batch_grad", dtype_name(p.grad)},
                            {"accum", dtype_name(p.grad_accum)},
                            {"optimizer_grad", dtype_name(optimizer_grad_dtype(p))},
                            {"separate_buffer", p.grad_accum != p.grad}};
  j["modes"] = {{"fp16", c.fp16},
                {"bf16", c.bf16},
                {"fp16_auto_cast", c.fp16_auto_cast},
                {"bf16_immediate_grad_update", c.bf16_immediate_grad_update},
                {"fp16_master_weights_and_grads", c.fp16_master_weights_and_grads},
                {"bf16_master_weights_and_grads", c.bf16_master_weights_and_grads},
                {"bf16_optimizer_states", c.bf16_optimizer_states},
                {"amp", c.amp}};
  json s = {{"kind", to_string(c.scaler.kind)}};
  if (c.scaler.kind == scaler_kind::dynamic) {
    const dynamic_scale_args& d = c.scaler.dynamic;
    s["init_scale"] = d.init_scale;
    s["scale_window"] = d.scale_window;
    s["hysteresis"] = d.hysteresis;
    s["consecutive_hysteresis"] = d.consecutive_hysteresis;
    s["min_scale"] = d.min_scale;
    s["growth_factor"] = d.growth_factor;
    s["backoff_factor"] = d.backoff_factor;
    s["error_at_min"] = d.error_at_min;
  } else if (c.scaler.kind == scaler_kind::fixed) {
    s["scale"] = c.scaler.static_scale;
  } else {
    s["check_overflow"] = c.scaler.check_overflow;
  }
  j["scaler"] = s;
  j["zero_stage"] = c.zero.stage;
  j["zero"] = {{"stage", c.zero.stage},
               {"reduce_bucket_size", c.zero.reduce_bucket_size},
               {"allgather_bucket_size", c.zero.allgather_bucket_size},
               {"stage3_max_live_parameters", c.zero.stage3_max_live_parameters},
               {"bucket_elements", c.zero.bucket_elements},
               {"offload_optimizer",
                {{"device", c.zero.offload_optimizer.device},
                 {"pin_memory", c.zero.offload_optimizer.pin_memory},
                 {"ratio", c.zero.offload_optimizer.ratio}}}};
  j["zero_allow_untested_optimizer"] = c.zero_allow_untested_optimizer;
  const optimizer_config& o = c.optimizer;
  json opt = {{"type", o.type.empty() ? json(nullptr) : json(o.type)}, {"name", o.name}};
  if (o.name == "adam" || o.name == "adamw") {
    opt.update({{"lr", o.adam_args.lr},
                {"betas", {o.adam_args.beta1, o.adam_args.beta2}},
                {"eps", o.adam_args.eps},
                {"weight_decay", o.adam_args.weight_decay},
                {"adam_w_mode", o.adam_args.adam_w_mode},
                {"amsgrad", o.adam_args.amsgrad},
                {"bias_correction", o.adam_args.bias_correction},
                {"torch_adam", o.torch_adam}});
  } else if (o.name == "sgd") {
    opt.update({{"lr", o.sgd_args.lr},
                {"momentum", o.sgd_args.momentum},
                {"dampening", o.sgd_args.dampening},
                {"weight_decay", o.sgd_args.weight_decay},
                {"nesterov", o.sgd_args.nesterov}});
  } else if (o.name == "adagrad") {
    opt.update({{"lr", o.adagrad_args.lr},
                {"lr_decay", o.adagrad_args.lr_decay},
                {"weight_decay", o.adagrad_args.weight_decay},
                {"initial_accumulator_value", o.adagrad_args.initial_accumulator_value},
                {"eps", o.adagrad_args.eps}});
  } else if (o.name == "lamb") {
    opt.update({{"lr", o.lamb_args.lr},
                {"betas", {o.lamb_args.beta1, o.lamb_args.beta2}},
                {"eps", o.lamb_args.eps},
                {"weight_decay", o.lamb_args.weight_decay},
                {"bias_correction", o.lamb_args.bias_correction},
                {"max_coeff", o.lamb_args.max_coeff},
                {"min_coeff", o.lamb_args.min_coeff}});
  } else if (o.name == "lion") {
    opt.update({{"lr", o.lion_args.lr},
                {"betas", {o.lion_args.beta1, o.lion_args.beta2}},
                {"weight_decay", o.lion_args.weight_decay}});
  } else if (is_one_bit_optimizer(o.name)) {
    auto common = [&](const auto& a) {
      opt.update({{"lr", a.lr}, {"betas", {a.beta1, a.beta2}}, {"eps", a.eps}, {"weight_decay", a.weight_decay}});
    };
    if (o.name == "onebitadam") {
      common(o.onebit_adam_args);
      opt["freeze_step"] = o.onebit_adam_args.freeze_step;
    } else if (o.name == "zerooneadam") {
      const zero_one_adam::args& a = o.zero_one_adam_args;
      common(a);
      opt.update({{"var_freeze_step", a.var_freeze_step},
                  {"var_update_scaler", a.var_update_scaler},
                  {"local_step_scaler", a.local_step_scaler},
                  {"local_step_clipper", a.local_step_clipper}});
    } else {
      const onebit_lamb::args& a = o.onebit_lamb_args;
      common(a);
      opt.update({{"freeze_step", a.freeze_step},
                  {"max_coeff", a.max_coeff},
                  {"min_coeff", a.min_coeff},
                  {"coeff_beta", a.coeff_beta},
                  {"factor_max", a.factor_max},
                  {"factor_min", a.factor_min},
                  {"factor_threshold", a.factor_threshold}});
    }
    opt.update({{"comm_backend_name", o.comm_backend_name},
                {"cuda_aware", o.cuda_aware},
                {"accept_unverified_precision", o.accept_unverified_precision}});
  } else if (o.name == "muon") {
    const muon::args& m = o.muon_args;
    const adamw::args& a = o.muon_aux_args;
    opt["muon"] = {{"lr", m.lr},
                   {"momentum", m.momentum},
                   {"weight_decay", m.weight_decay},
                   {"nesterov", m.nesterov},
                   {"ns_method", o.ns_method},
                   {"ns_iteration", "standard"},  // what mpopt runs for either ns_method
                   {"ns_steps", m.ns_steps},
                   {"ns_coefficients", {m.ns_coefficients.a, m.ns_coefficients.b, m.ns_coefficients.c}},
                   {"eps", m.eps},
                   {"adjust_lr", to_string(m.adjust_lr)}};
    opt["aux_adamw"] = {{"lr", a.lr},
                        {"betas", {a.beta1, a.beta2}},
                        {"eps", a.eps},
                        {"weight_decay", a.weight_decay},
                        {"bias_correction", a.bias_correction}};
  }
  j["optimizer"] = opt;
  j["gradient_clipping"] = c.gradient_clipping;
  j["torch_autocast"] = {{"enabled", c.torch_autocast.enabled},
                         {"dtype", c.torch_autocast.dtype.empty() ? json(nullptr) : json(c.torch_autocast.dtype)},
                         {"lower_precision_safe_modules", c.torch_autocast.lower_precision_safe_modules}};
  j["warnings"] = c.warnings;
  return j;
}

}  // namespace mpopt::deepspeed
