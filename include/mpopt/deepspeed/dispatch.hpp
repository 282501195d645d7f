// A validated DeepSpeed config (deepspeed/config.hpp) -> the mpopt::optimizer<Rule, Prec, Scaler> (or, for the 1-bit
// optimizers, mpopt::onebit::optimizer<Rule, Prec, Scaler>) the build has. Host only; requires nlohmann/json (through
// config.hpp).
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
//
// The 1-bit rules (OneBitAdam, ZeroOneAdam, OneBitLamb) are in default_onebit_rules, not in default_rules: put them in
// Rules and f is called with type_tag<mpopt::onebit::optimizer<Rule, Prec, Scaler>> for those configs (only for the
// precision/scaler combinations a valid 1-bit config can select: fp16 params and grads with a loss scaler, or fp32 /
// bf16 ones without, an fp32 master and fp32 states; at most 11 types). Its constructor takes onebit_options_of(cfg)
// and, for more than one rank, a host communicator:
//
//   using rules = std::tuple<mpopt::adamw, mpopt::onebit_adam>;
//   dispatch<precs, rules>(cfg, [&](auto tag) {
//     using opt_t = typename decltype(tag)::type;
//     ...  // the group as above
//     if constexpr (mpopt::deepspeed::is_onebit_optimizer_v<opt_t>) {
//       opt_t opt({g}, comm, scaler_args<scaler_of_t<opt_t>>(cfg), step_options_of(cfg), onebit_options_of(cfg));
//     } else {
//       opt_t opt({g}, scaler_args<scaler_of_t<opt_t>>(cfg), step_options_of(cfg));
//     }
//   });
//
// Muon (optimizer.type "Muon") is in default_muon_rules: put mpopt::muon (fp32 Newton-Schulz GEMMs) or
// muon_rule<muon_gemm<bf16_t>> in Rules and f is called with type_tag<mpopt::muon_optimizer<Prec, Scaler, Gemm>>
// (is_muon_optimizer_v). Which params are matrices (DeepSpeed's use_muon) is the caller's choice:
//
//   if constexpr (mpopt::deepspeed::is_muon_optimizer_v<opt_t>) {
//     typename opt_t::matrix_group_type m{params, grads, shapes, muon_args_of(cfg)};
//     typename opt_t::aux_group_type a;  // + buffers of the other params
//     a.hparams = muon_aux_args_of(cfg);
//     opt_t opt({m}, {a}, comm, zero_options_of(cfg), scaler_args<scaler_of_t<opt_t>>(cfg), step_options_of(cfg));
//   }
//
// The precision's grad role is precision.grad_accum (data_types.grad_accum_dtype): the optimizer reads the buffer the
// caller accumulates the micro-batch grads in (mpopt/grad_accumulation.hpp), e.g. a bf16 model with fp32
// accumulation gets mpopt::precision<param<bf16_t>, master<float>, grad<float>, state<float>>.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>

#include "../error.hpp"
#include "../muon.hpp"
#include "../onebit/optimizer.hpp"
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
// The 1-bit rules, dispatched to mpopt::onebit::optimizer. Not in default_rules, so that callbacks written for
// mpopt::optimizer keep compiling; add them to Rules (e.g. decltype(std::tuple_cat(default_rules{},
// default_onebit_rules{}))) where the callback handles both.
using default_onebit_rules = std::tuple<onebit_adam, zero_one_adam, onebit_lamb>;
using default_scalers = std::tuple<no_scaler, static_scaler, dynamic_scaler>;

// In Rules: optimizer.type "Muon" dispatches to mpopt::muon_optimizer<Prec, Scaler, Gemm>. mpopt::muon itself stands
// for muon_rule<muon_gemm<float>>; give muon_rule<muon_gemm<bf16_t>> for bf16 GEMMs (DeepSpeed's GPU precision).
template <class Gemm>
struct muon_rule {
  static constexpr const char* name = muon::name;
  using gemm_type = Gemm;
};
// Muon, dispatched to mpopt::muon_optimizer with fp32 GEMMs; not in default_rules, as the 1-bit rules are not.
using default_muon_rules = std::tuple<muon>;

template <class Rule>
struct is_muon_rule : std::is_same<Rule, muon> {};
template <class Gemm>
struct is_muon_rule<muon_rule<Gemm>> : std::true_type {};
template <class Rule>
inline constexpr bool is_muon_rule_v = is_muon_rule<Rule>::value;

// The Gemm of muon_optimizer for a Muon rule of Rules.
template <class Rule>
struct muon_gemm_of {
  using type = muon_gemm<float>;
};
template <class Gemm>
struct muon_gemm_of<muon_rule<Gemm>> {
  using type = Gemm;
};

template <class Rule>
struct is_onebit_rule : std::bool_constant<std::is_same_v<Rule, onebit_adam> || std::is_same_v<Rule, zero_one_adam> ||
                                           std::is_same_v<Rule, onebit_lamb>> {};
template <class Rule>
inline constexpr bool is_onebit_rule_v = is_onebit_rule<Rule>::value;

// Whether a type dispatch() passes is an mpopt::onebit::optimizer (its constructor takes onebit_options_of(cfg)).
template <class Opt>
struct is_onebit_optimizer : std::false_type {};
template <class Rule, class Prec, class Scaler>
struct is_onebit_optimizer<onebit::optimizer<Rule, Prec, Scaler>> : std::true_type {};
template <class Opt>
inline constexpr bool is_onebit_optimizer_v = is_onebit_optimizer<Opt>::value;

// Whether a type dispatch() passes is an mpopt::muon_optimizer (matrix groups and aux AdamW groups).
template <class Opt>
struct is_muon_optimizer : std::false_type {};
template <class Prec, class Scaler, class Gemm>
struct is_muon_optimizer<muon_optimizer<Prec, Scaler, Gemm>> : std::true_type {};
template <class Opt>
inline constexpr bool is_muon_optimizer_v = is_muon_optimizer<Opt>::value;

// The Scaler of a type dispatch() passes (mpopt::optimizer::scaler_type; onebit::optimizer has no such alias), for
// scaler_args<scaler_of_t<opt_t>>(cfg) in a callback that handles both.
template <class Opt>
struct scaler_of {
  using type = typename Opt::scaler_type;
};
template <class Rule, class Prec, class Scaler>
struct scaler_of<onebit::optimizer<Rule, Prec, Scaler>> {
  using type = Scaler;
};
template <class Opt>
using scaler_of_t = typename scaler_of<Opt>::type;

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
  } else if constexpr (std::is_same_v<Rule, onebit_adam>) {
    return o.onebit_adam_args;
  } else if constexpr (std::is_same_v<Rule, zero_one_adam>) {
    return o.zero_one_adam_args;
  } else if constexpr (std::is_same_v<Rule, onebit_lamb>) {
    return o.onebit_lamb_args;
  } else if constexpr (std::is_same_v<Rule, muon>) {
    return o.muon_args;  // the matrices'; muon_aux_args_of() has the other params'
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

// For mpopt::onebit::optimizer. accept_unverified_precision: as the importer recorded it, true when the config's
// params and grads are not fp16. DeepSpeed runs such a config with a warning; mpopt's C++ API refuses it unless
// opted in; the importer opts in because the config asked for it, and the warning (config::warnings) says so.
// bucket_elements: zero.bucket_elements (zero_optimization.reduce_bucket_size when given, else mpopt's 1 M), the
// largest piece of the exact all-reduce, as for zero_options.
inline onebit::options onebit_options_of(const config& c) {
  onebit::options o;
  o.accept_unverified_precision = c.optimizer.accept_unverified_precision;
  o.bucket_elements = c.zero.bucket_elements;
  return o;
}

// For mpopt::muon_optimizer: the matrix groups' hyper-parameters (DeepSpeed's use_muon params: lr from muon_lr, else
// lr), and the aux AdamW groups' (the other params: lr from adam_lr, else lr).
inline muon::args muon_args_of(const config& c) {
  return rule_args<muon>(c);
}
inline adamw::args muon_aux_args_of(const config& c) {
  return c.optimizer.muon_aux_args;
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
  if (c.zero.offload_optimizer.device == "cpu")
    return unsupported(
        "zero_optimization.offload_optimizer.device \"cpu\": dispatch() hands out host optimizers only; for CPU "
        "offload construct mpopt::cuda::offload_optimizer<Rule, Prec, Scaler> (mpopt/cuda/offload.cuh) with the "
        "rule, policy and scaler this config selects, or remove offload_optimizer");
  if (c.zero.offload_optimizer.device != "none")
    return unsupported("zero_optimization.offload_optimizer.device \"" + c.zero.offload_optimizer.device +
                       "\": offload to this device is not available in this build");
  // DeepSpeed runs Muon at stage 3; mpopt::muon_optimizer refuses it (Newton-Schulz needs whole matrices).
  if (o.name == "muon" && c.zero.stage == 3)
    return unsupported("zero_optimization.stage 3 with optimizer.type \"" + o.type +
                       "\": mpopt::muon_optimizer keeps whole matrices and runs ZeRO stages 0-2 only; use "
                       "zero_optimization.stage 2");
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

// The optimizer's policy: its grad role is the accumulation dtype.
inline std::string precision_name(const precision_config& p) {
  return std::string("mpopt::precision<mpopt::param<") + cpp_type_name(p.param) + ">, mpopt::master<" +
         cpp_type_name(p.master) + ">, mpopt::grad<" + cpp_type_name(optimizer_grad_dtype(p)) + ">, mpopt::state<" +
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

// Calls g(T{}) for each type T of the std::tuple List.
template <class List, class G>
void for_each_type(G&& g) {
  std::apply([&](auto... t) { (g(t), ...); }, List{});
}

// Whether a valid 1-bit config can select onebit::optimizer<Rule, Prec, Scaler>: ZeRO stage 0 rules out a 16-bit
// master and bf16 states, and the importer a separate grad_accum dtype, so params and grads are fp32, fp16 or bf16
// with an fp32 master and fp32 states; fp16 has a loss scaler (OneBitLamb: dynamic only), the others none. dispatch()
// instantiates only these (and onebit::optimizer's own static_asserts, fp32 compute and round-to-nearest, hold for
// them).
template <class Rule, class Prec, class Scaler>
constexpr bool onebit_selectable() {
  using P = typename Prec::param_t;
  constexpr bool roles = std::is_same_v<typename Prec::compute_t, float> &&
                         std::is_same_v<typename Prec::master_t, float> &&
                         std::is_same_v<typename Prec::master_rounding, nearest_rounding> &&
                         std::is_same_v<typename Prec::state_t, float> && std::is_same_v<typename Prec::grad_t, P>;
  if constexpr (!roles) {
    return false;
  } else if constexpr (std::is_same_v<P, half_t>) {
    return !std::is_same_v<Scaler, no_scaler> &&
           !(std::is_same_v<Rule, onebit_lamb> && std::is_same_v<Scaler, static_scaler>);
  } else {
    return std::is_same_v<Scaler, no_scaler> && (std::is_same_v<P, float> || std::is_same_v<P, bf16_t>);
  }
}

template <class Rules>
constexpr int count_muon_rules() {
  return std::apply([](auto... r) { return (0 + ... + int(is_muon_rule_v<decltype(r)>)); }, Rules{});
}

}  // namespace detail

// The optimizer type the config selects, as C++ (whether or not it is compiled in). Muon: with fp32 GEMMs
// (mpopt::muon in Rules).
inline std::string optimizer_type_name(const config& c) {
  const std::string prec = detail::precision_name(c.precision);
  const std::string scaler = detail::scaler_type_name(c.scaler.kind);
  if (c.optimizer.name == "muon") return "mpopt::muon_optimizer<" + prec + ", " + scaler + ", mpopt::muon_gemm<float>>";
  const char* opt = is_one_bit_optimizer(c.optimizer.name) ? "mpopt::onebit::optimizer" : "mpopt::optimizer";
  return std::string(opt) + "<mpopt::" + rule_name(c.optimizer.name) + ", " + prec + ", " + scaler + ">";
}

// Calls f(type_tag<mpopt::optimizer<Rule, Prec, Scaler>>{}) once for the combination `c` selects, Rule from
// Rules, Prec from Precisions, Scaler from Scalers (std::tuples). Prec's grad role is precision.grad_accum. For a
// 1-bit rule (is_onebit_rule_v) the type is mpopt::onebit::optimizer<Rule, Prec, Scaler>, instantiated only for the
// combinations a valid 1-bit config selects (detail::onebit_selectable); for a Muon rule (is_muon_rule_v) it is
// mpopt::muon_optimizer<Prec, Scaler, Gemm>, instantiated for fp32-compute policies. Returns errc::unsupported,
// calling nothing, when the combination is not in those lists or not available in this build (availability()); the
// message names it.
template <class Precisions = supported_precisions, class Rules = default_rules, class Scalers = default_scalers,
          class F>
status dispatch(const config& c, F&& f) {
  static_assert(detail::count_muon_rules<Rules>() <= 1,
                "mpopt::deepspeed::dispatch: Rules holds more than one Muon rule; keep one of mpopt::muon and "
                "mpopt::deepspeed::muon_rule<...>");
  const status a = availability(c);
  if (!a.ok()) return a;
  const std::string missing = " is not in the compiled set of mpopt::deepspeed::dispatch's ";
  const std::string rule = rule_name(c.optimizer.name);
  const bool onebit = is_one_bit_optimizer(c.optimizer.name);
  if (!detail::has_rule<Rules>(rule))
    return status{errc::unsupported,
                  "rule mpopt::" + rule + " (optimizer.type \"" + c.optimizer.type + "\")" + missing +
                      "Rules; add it there" +
                      (onebit ? " (mpopt::deepspeed::default_onebit_rules has the 1-bit rules; they dispatch to "
                                "mpopt::onebit::optimizer)"
                       : rule == muon::name
                           ? " (mpopt::deepspeed::default_muon_rules has it; it dispatches to mpopt::muon_optimizer)"
                           : "")};
  if (!detail::has_scaler<Scalers>(c.scaler.kind))
    return status{errc::unsupported,
                  std::string(detail::scaler_type_name(c.scaler.kind)) + missing + "Scalers; add it there"};
  const precision_config& p = c.precision;
  bool called = false;
  const dtype grad_role = optimizer_grad_dtype(p);  // the policy reads the accumulation buffer
  const bool found = dispatch_precision<Precisions>(p.param, p.master, grad_role, p.state, [&](auto prec) {
    using Prec = std::decay_t<decltype(prec)>;  // decay: GCC 12 reads these as references in nested lambdas
    detail::for_each_type<Rules>([&](auto r) {
      using Rule = std::decay_t<decltype(r)>;
      if (rule != Rule::name) return;
      detail::for_each_type<Scalers>([&](auto s) {
        using Scaler = std::decay_t<decltype(s)>;
        if (scaler_kind_of<Scaler>::value != c.scaler.kind) return;
        if constexpr (is_muon_rule_v<Rule>) {
          if constexpr (std::is_same_v<typename Prec::compute_t, float>) {  // muon_optimizer's requirement
            called = true;
            f(type_tag<muon_optimizer<Prec, Scaler, typename muon_gemm_of<Rule>::type>>{});
          }
        } else if constexpr (!is_onebit_rule_v<Rule>) {
          called = true;
          f(type_tag<optimizer<Rule, Prec, Scaler>>{});
        } else if constexpr (detail::onebit_selectable<Rule, Prec, Scaler>()) {
          called = true;
          f(type_tag<onebit::optimizer<Rule, Prec, Scaler>>{});
        }
      });
    });
  });
  if (!found) return status{errc::unsupported, detail::precision_name(p) + missing + "Precisions; add it there"};
  if (!called)  // a hand-made config: parse_config never gives one
    return status{errc::unsupported,
                  optimizer_type_name(c) +
                      (rule == muon::name
                           ? ": mpopt::muon_optimizer needs an fp32-compute precision policy"
                           : ": not a combination a valid 1-bit config selects (fp16 params and grads with a loss "
                             "scaler, dynamic for OneBitLamb, or fp32 / bf16 ones without; an fp32 master and fp32 "
                             "states), so dispatch() does not instantiate it; construct it directly")};
  return status::success();
}

}  // namespace mpopt::deepspeed
