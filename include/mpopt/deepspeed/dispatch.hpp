// A validated DeepSpeed config (deepspeed/config.hpp) -> the mpopt::optimizer<Rule, Prec, Scaler> the build has.
// Host only; requires nlohmann/json (through config.hpp).
//
// Dtypes and policies are template parameters, so the caller names the set it compiles in; dispatch() calls
// f(type_tag<mpopt::optimizer<Rule, Prec, Scaler>>{}) for the one the config selects, and only that set is
// instantiated:
//
//   using precs = std::tuple<mpopt::fp16_mixed_policy, mpopt::bf16_mixed_policy>;
//   using rules = std::tuple<mpopt::adamw>;
//   mpopt::status s = mpopt::deepspeed::dispatch<precs, rules>(cfg, [&](auto tag) {
//     using opt_t = typename decltype(tag)::type;
//     mpopt::param_group<typename opt_t::rule_type, typename opt_t::precision_type> g;  // + buffers
//     g.hparams = mpopt::deepspeed::rule_args<typename opt_t::rule_type>(cfg);
//     opt_t opt({g}, mpopt::deepspeed::scaler_args<typename opt_t::scaler_type>(cfg),
//               mpopt::deepspeed::step_options_of(cfg));
//   });
//   // s: errc::unsupported naming what is missing from the compiled set, or what this build cannot run yet.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>

#include "../error.hpp"
#include "../optimizer.hpp"
#include "../policy/supported.hpp"
#include "../scaler/scalers.hpp"
#include "config.hpp"

namespace mpopt::deepspeed {

template <class T>
struct type_tag {
  using type = T;
};

using default_rules = std::tuple<adam, adamw, sgd, adagrad, lamb, lion>;
using default_scalers = std::tuple<no_scaler, static_scaler, dynamic_scaler>;

template <class Scaler>
struct scaler_kind_of;
template <>
struct scaler_kind_of<no_scaler> : std::integral_constant<scaler_kind, scaler_kind::none> {};
template <>
struct scaler_kind_of<static_scaler> : std::integral_constant<scaler_kind, scaler_kind::fixed> {};
template <>
struct scaler_kind_of<dynamic_scaler> : std::integral_constant<scaler_kind, scaler_kind::dynamic> {};

// The rule's hyper-parameters from the config.
template <class Rule>
typename Rule::args rule_args(const config& c) {
  const optimizer_config& o = c.optimizer;
  if constexpr (std::is_same_v<Rule, adamw>) {
    adamw::args a;
    static_cast<adam::args&>(a) = o.adam_args;
    return a;
  } else if constexpr (std::is_same_v<Rule, adam>) {
    return o.adam_args;
  } else if constexpr (std::is_same_v<Rule, sgd>) {
    return o.sgd_args;
  } else if constexpr (std::is_same_v<Rule, adagrad>) {
    return o.adagrad_args;
  } else if constexpr (std::is_same_v<Rule, lamb>) {
    return o.lamb_args;
  } else {
    static_assert(std::is_same_v<Rule, lion>, "mpopt::deepspeed::rule_args: no DeepSpeed mapping for this rule");
    return o.lion_args;
  }
}

template <class Scaler>
typename Scaler::args scaler_args(const config& c) {
  typename Scaler::args a{};
  if constexpr (std::is_same_v<Scaler, dynamic_scaler>) {
    a = c.scaler.dynamic;
  } else if constexpr (std::is_same_v<Scaler, static_scaler>) {
    a.scale = c.scaler.static_scale;
  } else {
    static_assert(std::is_same_v<Scaler, no_scaler>, "mpopt::deepspeed::scaler_args: unknown scaler");
    a.check_overflow = c.scaler.check_overflow;
  }
  return a;
}

// gradient_clipping is the clip norm in every precision. The scale order is mpopt's (the scale that produced the
// grads); set deepspeed_scale_order yourself for bit-parity with DeepSpeed.
inline step_options step_options_of(const config& c) {
  step_options o;
  o.max_grad_norm = c.gradient_clipping;
  return o;
}

inline zero_options zero_options_of(const config& c) {
  zero_options z;
  z.stage = c.zero.stage;
  z.bucket_elements = c.zero.bucket_elements;
  z.max_live_elements = c.zero.stage3_max_live_parameters;
  return z;
}

// What no build can run yet, whatever it compiles in (errc::unsupported); success otherwise.
inline status availability(const config& c) {
  auto unsupported = [](std::string m) { return status{errc::unsupported, std::move(m)}; };
  const optimizer_config& o = c.optimizer;
  if (o.name.empty())
    return unsupported(
        "optimizer: the config has no optimizer section (DeepSpeed would use the client optimizer); "
        "pick the rule in code, or add \"optimizer\": {\"type\": ...}");
  if (is_one_bit_optimizer(o.name) || o.name == "muon")
    return unsupported("optimizer.type \"" + o.type + "\": not available in this build yet");
  if (c.zero.offload_optimizer.device != "none")
    return unsupported("zero_optimization.offload_optimizer.device \"" + c.zero.offload_optimizer.device +
                       "\": optimizer offload is not available in this build yet");
  if (c.precision.grad_accum != c.precision.grad)
    return unsupported(std::string("data_types.grad_accum_dtype ") + dtype_name(c.precision.grad_accum) +
                       " differs from the grad dtype " + dtype_name(c.precision.grad) +
                       ": separate gradient-accumulation buffers are not available in this build yet");
  return status::success();
}

namespace detail {

inline const char* cpp_type_name(dtype d) {
  switch (d) {
    case dtype::fp32: return "float";
    case dtype::fp16: return "mpopt::half_t";
    case dtype::bf16: return "mpopt::bf16_t";
    case dtype::fp64: return "double";
  }
  return "?";
}

inline std::string precision_name(const precision_config& p) {
  return std::string("mpopt::precision<mpopt::param<") + cpp_type_name(p.param) + ">, mpopt::master<" +
         cpp_type_name(p.master) + ">, mpopt::grad<" + cpp_type_name(p.grad) + ">, mpopt::state<" +
         cpp_type_name(p.state) + ">>";
}

inline const char* scaler_type_name(scaler_kind k) {
  switch (k) {
    case scaler_kind::none: return "mpopt::no_scaler";
    case scaler_kind::fixed: return "mpopt::static_scaler";
    case scaler_kind::dynamic: return "mpopt::dynamic_scaler";
  }
  return "?";
}

template <class Rules>
bool has_rule(const std::string& name) {
  return std::apply([&](auto... r) { return ((name == decltype(r)::name) || ...); }, Rules{});
}

template <class Scalers>
bool has_scaler(scaler_kind k) {
  return std::apply([&](auto... s) { return ((scaler_kind_of<decltype(s)>::value == k) || ...); }, Scalers{});
}

}  // namespace detail

// The optimizer type the config selects, as C++ (whether or not it is compiled in).
inline std::string optimizer_type_name(const config& c) {
  return "mpopt::optimizer<mpopt::" + c.optimizer.name + ", " + detail::precision_name(c.precision) + ", " +
         detail::scaler_type_name(c.scaler.kind) + ">";
}

// Calls f(type_tag<mpopt::optimizer<Rule, Prec, Scaler>>{}) once for the combination `c` selects, Rule from
// Rules, Prec from Precisions, Scaler from Scalers (std::tuples). Returns errc::unsupported, calling nothing, when
// the combination is not in those lists or not available in this build (availability()); the message names it.
template <class Precisions = supported_precisions, class Rules = default_rules, class Scalers = default_scalers,
          class F>
status dispatch(const config& c, F&& f) {
  const status a = availability(c);
  if (!a.ok()) return a;
  const std::string missing = " is not in the compiled set of mpopt::deepspeed::dispatch's ";
  if (!detail::has_rule<Rules>(c.optimizer.name))
    return status{errc::unsupported, "rule mpopt::" + c.optimizer.name + " (optimizer.type \"" + c.optimizer.type +
                                         "\")" + missing + "Rules; add it there"};
  if (!detail::has_scaler<Scalers>(c.scaler.kind))
    return status{errc::unsupported,
                  std::string(detail::scaler_type_name(c.scaler.kind)) + missing + "Scalers; add it there"};
  const precision_config& p = c.precision;
  const bool found = dispatch_precision<Precisions>(p.param, p.master, p.grad, p.state, [&](auto prec) {
    using Prec = decltype(prec);
    std::apply(
        [&](auto... rule) {
          (
              [&](auto r) {
                using Rule = decltype(r);
                if (c.optimizer.name != Rule::name) return;
                std::apply(
                    [&](auto... scaler) {
                      (
                          [&](auto s) {
                            using Scaler = decltype(s);
                            if (scaler_kind_of<Scaler>::value == c.scaler.kind)
                              f(type_tag<optimizer<Rule, Prec, Scaler>>{});
                          }(scaler),
                          ...);
                    },
                    Scalers{});
              }(rule),
              ...);
        },
        Rules{});
  });
  if (!found) return status{errc::unsupported, detail::precision_name(p) + missing + "Precisions; add it there"};
  return status::success();
}

}  // namespace mpopt::deepspeed
