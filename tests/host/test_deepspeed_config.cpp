// DeepSpeed config import: defaults equal DeepSpeed's (reference/deepspeed_precision.md §5.1), each validation
// rule (§5.2) gives an error naming the key, and the dispatcher reaches the compiled optimizer.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "mpopt/deepspeed/config.hpp"
#include "mpopt/deepspeed/dispatch.hpp"

using nlohmann::json;
namespace ds = mpopt::deepspeed;

namespace {

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& e : v) s += e + "\n";
  return s;
}

// The config must parse cleanly; returns it.
ds::config good(const json& j) {
  const ds::parse_result r = ds::parse_config(j);
  INFO(joined(r.errors));
  REQUIRE(r.ok());
  return r.cfg;
}

// The config must fail; returns all error messages.
std::string bad(const json& j) {
  const ds::parse_result r = ds::parse_config(j);
  REQUIRE_FALSE(r.ok());
  return joined(r.errors);
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("deepspeed config: an empty config gives DeepSpeed's defaults") {
  const ds::config c = good(json::object());
  CHECK(c.precision.param == mpopt::dtype::fp32);
  CHECK(c.precision.master == mpopt::dtype::fp32);
  CHECK(c.precision.grad == mpopt::dtype::fp32);
  CHECK(c.precision.state == mpopt::dtype::fp32);
  CHECK(c.precision.grad_accum == mpopt::dtype::fp32);
  CHECK(c.scaler.kind == ds::scaler_kind::none);
  CHECK(c.scaler.check_overflow);  // bf16.check_grad_overflow default true
  CHECK(c.zero.stage == 0);
  CHECK(c.zero.reduce_bucket_size == 500000000);
  CHECK(c.zero.allgather_bucket_size == 500000000);
  CHECK(c.zero.bucket_elements == (std::size_t(1) << 20));
  CHECK(c.zero.offload_optimizer.device == "none");
  CHECK(c.gradient_clipping == 1.0);  // DeepSpeed's default since 2026-06-23
  CHECK(c.optimizer.name.empty());
  CHECK_FALSE(c.amp);
  CHECK_FALSE(c.zero_allow_untested_optimizer);
  CHECK_FALSE(c.torch_autocast.enabled);
  CHECK(c.torch_autocast.lower_precision_safe_modules.size() == 4);
  CHECK(c.warnings.empty());
  CHECK(ds::step_options_of(c).max_grad_norm == 1.0);
}

TEST_CASE("deepspeed config: fp16 dynamic scaling defaults, ZeRO and stage 0") {
  const ds::config z = good({{"fp16", {{"enabled", true}}}, {"zero_optimization", {{"stage", 1}}}});
  CHECK(z.precision.param == mpopt::dtype::fp16);
  CHECK(z.precision.grad == mpopt::dtype::fp16);
  CHECK(z.precision.master == mpopt::dtype::fp32);
  CHECK(z.precision.grad_accum == mpopt::dtype::fp16);
  REQUIRE(z.scaler.kind == ds::scaler_kind::dynamic);
  CHECK(z.scaler.dynamic.init_scale == 65536.f);
  CHECK(z.scaler.dynamic.scale_window == 1000);
  CHECK(z.scaler.dynamic.hysteresis == 2);
  CHECK_FALSE(z.scaler.dynamic.consecutive_hysteresis);
  CHECK(z.scaler.dynamic.min_scale == 1.f);
  CHECK(z.scaler.dynamic.error_at_min);

  // Without ZeRO DeepSpeed's FP16_Optimizer has no hysteresis and clamps at the minimum.
  const ds::config s0 = good({{"fp16", {{"enabled", true}, {"initial_scale_power", 8}, {"min_loss_scale", 2.0}}}});
  CHECK(s0.scaler.dynamic.init_scale == 256.f);
  CHECK(s0.scaler.dynamic.min_scale == 2.f);
  CHECK(s0.scaler.dynamic.hysteresis == 1);
  CHECK_FALSE(s0.scaler.dynamic.error_at_min);
  CHECK(s0.warnings.empty());
  const ds::config h = good({{"fp16", {{"enabled", true}, {"hysteresis", 4}}}});
  CHECK(h.scaler.dynamic.hysteresis == 1);
  CHECK(contains(joined(h.warnings), "fp16.hysteresis"));

  const ds::config st =
      good({{"fp16", {{"enabled", true}, {"loss_scale", 138}}}, {"zero_optimization", {{"stage", 2}}}});
  CHECK(st.scaler.kind == ds::scaler_kind::fixed);
  CHECK(st.scaler.static_scale == 138.f);
  CHECK(ds::scaler_args<mpopt::static_scaler>(st).scale == 138.f);
}

TEST_CASE("deepspeed config: fp16.loss_scale must be a finite number >= 0") {
  for (const json& v : {json(-1), json(std::numeric_limits<double>::infinity()), json("inf"), json("nan"), json(true),
                        json::array(), json::object(), json("abc")}) {
    CAPTURE(v.dump());
    CHECK(contains(bad({{"fp16", {{"enabled", true}, {"loss_scale", v}}}}), "fp16.loss_scale"));
  }
  for (const json& v : {json(0), json(1), json(2.0), json("3")})
    good({{"fp16", {{"enabled", true}, {"loss_scale", v}}}});
  CHECK(good({{"fp16", {{"enabled", true}, {"loss_scale", "3"}}}}).scaler.static_scale == 3.f);
}

TEST_CASE("deepspeed config: loss_scale_window and min_loss_scale must be > 0 under dynamic scaling only") {
  for (const char* key : {"loss_scale_window", "min_loss_scale"}) {
    for (int v : {0, -1}) {
      CAPTURE(key);
      CAPTURE(v);
      const std::string e = bad({{"fp16", {{"enabled", true}, {key, v}}}});
      CHECK(contains(e, std::string("fp16.") + key));
      CHECK(contains(e, "got " + std::to_string(v)));
      good({{"fp16", {{"enabled", true}, {"loss_scale", 128}, {key, v}}}});  // static: not used
      good({{"fp16", {{"enabled", false}, {key, v}}}});                      // fp16 off
    }
    good({{"fp16", {{"enabled", true}, {key, 1}}}});
    good({{"fp16", {{"enabled", true}, {key, 1000}}}});
    for (const json& v : {json(true), json(nullptr), json("abc")})
      CHECK(contains(bad({{"fp16", {{"enabled", true}, {key, v}}}}), std::string("fp16.") + key));
  }
  // min_loss_scale is an integer field: 0.25 rejected, 2.0 accepted.
  CHECK(contains(bad({{"fp16", {{"enabled", true}, {"min_loss_scale", 0.25}}}}), "must be an integer"));
}

TEST_CASE("deepspeed config: fp16 and bf16 together are refused") {
  const std::string e = bad({{"fp16", {{"enabled", true}}}, {"bf16", {{"enabled", true}}}});
  CHECK(contains(e, "fp16.enabled and bf16.enabled"));
  CHECK(contains(e, "Set one of them to false"));
}

TEST_CASE("deepspeed config: AMP with ZeRO is refused, pointing to fp16") {
  const std::string e = bad({{"amp", {{"enabled", true}, {"opt_level", "O2"}}}, {"zero_optimization", {{"stage", 2}}}});
  CHECK(contains(e, "amp.enabled"));
  CHECK(contains(e, "zero_optimization.stage 2"));
  CHECK(contains(e, "\"fp16\": {\"enabled\": true}"));
  CHECK(contains(bad({{"amp", {{"enabled", true}}}}), "apex AMP is not supported"));
  good({{"amp", {{"enabled", false}}}, {"zero_optimization", {{"stage", 2}}}});
}

TEST_CASE("deepspeed config: an untested optimizer with ZeRO needs zero_allow_untested_optimizer") {
  const json lamb = {{"type", "Lamb"}, {"params", {{"lr", 1e-3}}}};
  const std::string e = bad({{"optimizer", lamb}, {"zero_optimization", {{"stage", 1}}}});
  CHECK(contains(e, "optimizer.type: \"Lamb\""));
  CHECK(contains(e, "\"zero_allow_untested_optimizer\": true"));
  const ds::config c =
      good({{"optimizer", lamb}, {"zero_optimization", {{"stage", 1}}}, {"zero_allow_untested_optimizer", true}});
  CHECK(c.optimizer.name == "lamb");
  CHECK(contains(joined(c.warnings), "zero_allow_untested_optimizer is true"));
  // Tested ones pass without the flag; stage 0 needs no flag.
  for (const char* t : {"Adam", "AdamW", "Adagrad", "Lion"})
    good({{"optimizer", {{"type", t}}}, {"zero_optimization", {{"stage", 3}}}});
  good({{"optimizer", {{"type", "SGD"}}}});
}

TEST_CASE("deepspeed config: 1-bit optimizers warn without fp16 and are refused with ZeRO") {
  for (const char* t : {"OneBitAdam", "ZeroOneAdam", "OneBitLamb"}) {
    CAPTURE(t);
    const ds::config c = good({{"optimizer", {{"type", t}, {"params", {{"lr", 1e-3}}}}}});
    CHECK(contains(joined(c.warnings), "only verified under fp16"));
    CHECK(contains(joined(c.warnings), "the importer opts in"));
    CHECK(c.optimizer.accept_unverified_precision);
    const ds::config h = good({{"optimizer", {{"type", t}}}, {"fp16", {{"enabled", true}}}});
    CHECK(h.warnings.empty());
    CHECK_FALSE(h.optimizer.accept_unverified_precision);
    CHECK_FALSE(ds::onebit_options_of(h).accept_unverified_precision);
    for (int stage : {1, 2, 3}) {
      const std::string e =
          bad({{"optimizer", {{"type", t}}}, {"fp16", {{"enabled", true}}}, {"zero_optimization", {{"stage", stage}}}});
      CHECK(contains(e, "not compatible with ZeRO"));
      CHECK(contains(e, "zero_optimization.stage " + std::to_string(stage)));
    }
    // Available now; the default rule set (written for mpopt::optimizer) does not have them, and says where they are.
    CHECK(ds::availability(c).ok());
    const mpopt::status s = ds::dispatch(c, [](auto) { FAIL("called"); });
    CHECK(s.code == mpopt::errc::unsupported);
    CHECK(contains(s.message, "is not in the compiled set of mpopt::deepspeed::dispatch's Rules"));
    CHECK(contains(s.message, "default_onebit_rules"));
  }
  // Muon is no longer "not available": only its ZeRO stage 3 is (tested below).
  CHECK(ds::availability(good({{"optimizer", {{"type", "Muon"}}}, {"zero_optimization", {{"stage", 2}}}})).ok());
}

TEST_CASE("deepspeed config: 1-bit optimizers' defaults are DeepSpeed's") {
  const ds::config a = good({{"optimizer", {{"type", "OneBitAdam"}}}, {"fp16", {{"enabled", true}}}});
  CHECK(a.optimizer.name == "onebitadam");
  CHECK(ds::rule_name(a.optimizer.name) == "onebit_adam");
  const mpopt::onebit_adam::args oa = ds::rule_args<mpopt::onebit_adam>(a);
  CHECK(oa.lr == 1e-3);
  CHECK(oa.beta1 == 0.9);
  CHECK(oa.beta2 == 0.999);
  CHECK(oa.eps == 1e-8);
  CHECK(oa.weight_decay == 0.0);
  CHECK(oa.freeze_step == 100000);
  CHECK(a.optimizer.comm_backend_name == "nccl");
  CHECK_FALSE(a.optimizer.cuda_aware);

  const ds::config z = good({{"optimizer", {{"type", "ZeroOneAdam"}}}, {"fp16", {{"enabled", true}}}});
  CHECK(ds::rule_name(z.optimizer.name) == "zero_one_adam");
  const mpopt::zero_one_adam::args za = ds::rule_args<mpopt::zero_one_adam>(z);
  CHECK(za.lr == 1e-3);
  CHECK(za.beta1 == 0.9);
  CHECK(za.beta2 == 0.999);
  CHECK(za.eps == 1e-8);
  CHECK(za.weight_decay == 0.0);
  CHECK(za.var_freeze_step == 100000);
  CHECK(za.var_update_scaler == 16);
  CHECK(za.local_step_scaler == 32678);  // sic
  CHECK(za.local_step_clipper == 16);

  const ds::config l = good({{"optimizer", {{"type", "OneBitLamb"}}}, {"fp16", {{"enabled", true}}}});
  CHECK(ds::rule_name(l.optimizer.name) == "onebit_lamb");
  const mpopt::onebit_lamb::args la = ds::rule_args<mpopt::onebit_lamb>(l);
  CHECK(la.lr == 1e-3);
  CHECK(la.beta1 == 0.9);
  CHECK(la.beta2 == 0.999);
  CHECK(la.eps == 1e-8);
  CHECK(la.weight_decay == 0.0);
  CHECK(la.freeze_step == 100000);
  CHECK(la.max_coeff == 10.0);
  CHECK(la.min_coeff == 0.01);
  CHECK(la.coeff_beta == 0.9);
  CHECK(la.factor_max == 4.0);
  CHECK(la.factor_min == 0.5);
  CHECK(la.factor_threshold == 0.1);
  CHECK(l.warnings.empty());

  // The resolved arguments are printed.
  const json o = ds::to_json(l)["optimizer"];
  CHECK(o["freeze_step"] == 100000);
  CHECK(o["coeff_beta"] == 0.9);
  CHECK(o["betas"] == json({0.9, 0.999}));
  CHECK(o["accept_unverified_precision"] == false);
  CHECK_FALSE(o.contains("params"));
  CHECK(ds::to_json(z)["optimizer"]["local_step_scaler"] == 32678);
  CHECK(ds::optimizer_type_name(a) ==
        "mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::precision<mpopt::param<mpopt::half_t>, "
        "mpopt::master<float>, mpopt::grad<mpopt::half_t>, mpopt::state<float>>, mpopt::dynamic_scaler>");
}

TEST_CASE("deepspeed config: 1-bit optimizers' parameters under DeepSpeed's names") {
  const ds::config a = good({{"fp16", {{"enabled", true}}},
                             {"optimizer",
                              {{"type", "OneBitAdam"},
                               {"params",
                                {{"lr", 4e-4},
                                 {"betas", {0.8, 0.99}},
                                 {"eps", 1e-6},
                                 {"weight_decay", 0.01},
                                 {"freeze_step", 23000.0},
                                 {"cuda_aware", true},
                                 {"comm_backend_name", "mpi"},
                                 {"bias_correction", false},
                                 {"amsgrad", false}}}}}});
  const mpopt::onebit_adam::args oa = ds::rule_args<mpopt::onebit_adam>(a);
  CHECK(oa.lr == 4e-4);
  CHECK(oa.beta1 == 0.8);
  CHECK(oa.beta2 == 0.99);
  CHECK(oa.eps == 1e-6);
  CHECK(oa.weight_decay == 0.01);
  CHECK(oa.freeze_step == 23000);
  CHECK(a.optimizer.cuda_aware);
  CHECK(a.optimizer.comm_backend_name == "mpi");
  CHECK(a.warnings.empty());

  const ds::config z = good({{"fp16", {{"enabled", true}}},
                             {"optimizer",
                              {{"type", "ZeroOneAdam"},
                               {"params",
                                {{"var_freeze_step", 1000},
                                 {"var_update_scaler", 8},
                                 {"local_step_scaler", 1000},
                                 {"local_step_clipper", 4},
                                 {"lr", "auto"}}}}}});
  const mpopt::zero_one_adam::args za = ds::rule_args<mpopt::zero_one_adam>(z);
  CHECK(za.var_freeze_step == 1000);
  CHECK(za.var_update_scaler == 8);
  CHECK(za.local_step_scaler == 1000);
  CHECK(za.local_step_clipper == 4);
  CHECK(za.lr == 1e-3);  // "auto": the default

  const ds::config l = good({{"fp16", {{"enabled", true}}},
                             {"optimizer",
                              {{"type", "OneBitLamb"},
                               {"params",
                                {{"freeze_step", 1000},
                                 {"max_coeff", 0.3},
                                 {"min_coeff", 0.01},
                                 {"coeff_beta", 0.8},
                                 {"factor_max", 3.0},
                                 {"factor_min", 0.7},
                                 {"factor_threshold", 0.2}}}}}});
  const mpopt::onebit_lamb::args la = ds::rule_args<mpopt::onebit_lamb>(l);
  CHECK(la.freeze_step == 1000);
  CHECK(la.max_coeff == 0.3);
  CHECK(la.coeff_beta == 0.8);
  CHECK(la.factor_max == 3.0);
  CHECK(la.factor_min == 0.7);
  CHECK(la.factor_threshold == 0.2);

  // Keys DeepSpeed accepts and ignores: a warning when set to true.
  const ds::config w =
      good({{"optimizer", {{"type", "OneBitAdam"}, {"params", {{"bias_correction", true}, {"eps_inside_sqrt", true}}}}},
            {"fp16", {{"enabled", true}}}});
  CHECK(contains(joined(w.warnings), "optimizer.params.bias_correction: true is ignored"));
  CHECK(contains(joined(w.warnings), "optimizer.params.eps_inside_sqrt: true is ignored"));
}

TEST_CASE("deepspeed config: 1-bit optimizers' invalid parameters name the key and the value") {
  auto err = [](const char* type, const json& params) {
    return bad({{"fp16", {{"enabled", true}}}, {"optimizer", {{"type", type}, {"params", params}}}});
  };
  // amsgrad true: DeepSpeed raises.
  for (const char* t : {"OneBitAdam", "ZeroOneAdam", "OneBitLamb"}) {
    CAPTURE(t);
    const std::string e = err(t, {{"amsgrad", true}});
    CHECK(contains(e, "optimizer.params.amsgrad: true is not supported by optimizer \"" + std::string(t) + "\""));
    CHECK(contains(err(t, {{"betas", {0.9}}}), "optimizer.params.betas: must be a list of two numbers"));
    CHECK(contains(err(t, {{"betas", 0.9}}), "optimizer.params.betas: must be a list of two numbers"));
    CHECK(contains(err(t, {{"betas", {0.9, 1.5}}}), "optimizer.params.betas[1]: must be in [0, 1), got 1.5"));
    CHECK(contains(err(t, {{"betas", {-0.1, 0.9}}}), "optimizer.params.betas[0]: must be in [0, 1), got -0.1"));
    CHECK(contains(err(t, {{"lr", -1}}), "optimizer.params.lr: must be finite and >= 0, got -1"));
    CHECK(contains(err(t, {{"eps", 0}}), "optimizer.params.eps: must be finite and > 0, got 0"));
    CHECK(contains(err(t, {{"weight_decay", "x"}}), "optimizer.params.weight_decay: must be a number, got \"x\""));
    CHECK(contains(err(t, {{"cuda_aware", 1}}), "optimizer.params.cuda_aware: must be true or false, got 1"));
    CHECK(contains(err(t, {{"comm_backend_name", "gloo"}}),
                   "optimizer.params.comm_backend_name: must be \"nccl\", \"mpi\", \"compressed\" or \"hccl\", "
                   "got \"gloo\""));
    CHECK(contains(err(t, {{"max_grad_norm", 1.0}}), "\"gradient_clipping\": 1"));
    // Unknown keys are errors, as for the other optimizers; a key of a sibling rule is unknown too.
    const std::string u = err(t, {{"freeze_stp", 10}});
    CHECK(contains(u, "optimizer.params.freeze_stp: unknown parameter for optimizer \"" + std::string(t) + "\""));
    CHECK(contains(u, "(known: "));
  }
  CHECK(contains(err("ZeroOneAdam", {{"freeze_step", 10}}), "optimizer.params.freeze_step: unknown parameter"));
  CHECK(contains(err("OneBitAdam", {{"var_freeze_step", 10}}), "optimizer.params.var_freeze_step: unknown parameter"));
  CHECK(contains(err("OneBitAdam", {{"max_coeff", 1}}), "optimizer.params.max_coeff: unknown parameter"));

  CHECK(contains(err("OneBitAdam", {{"freeze_step", -1}}), "optimizer.params.freeze_step: must be >= 0, got -1"));
  CHECK(
      contains(err("OneBitAdam", {{"freeze_step", 0.5}}), "optimizer.params.freeze_step: must be an integer, got 0.5"));
  CHECK(contains(err("OneBitLamb", {{"freeze_step", -3}}), "optimizer.params.freeze_step: must be >= 0, got -3"));
  CHECK(contains(err("ZeroOneAdam", {{"var_freeze_step", -1}}),
                 "optimizer.params.var_freeze_step: must be >= 0, got -1"));
  for (const char* key : {"var_update_scaler", "local_step_scaler", "local_step_clipper"}) {
    CAPTURE(key);
    CHECK(contains(err("ZeroOneAdam", {{key, 0}}), std::string("optimizer.params.") + key + ": must be >= 1, got 0"));
  }
  CHECK(
      contains(err("OneBitLamb", {{"min_coeff", -1}}), "optimizer.params.min_coeff: must be finite and >= 0, got -1"));
  CHECK(contains(err("OneBitLamb", {{"coeff_beta", 1}}), "optimizer.params.coeff_beta: must be in [0, 1), got 1"));
  CHECK(contains(err("OneBitLamb", {{"factor_min", 0}}), "optimizer.params.factor_min: must be finite and > 0, got 0"));
  CHECK(contains(err("OneBitLamb", {{"factor_threshold", -0.5}}),
                 "optimizer.params.factor_threshold: must be finite and >= 0, got -0.5"));
  CHECK(contains(err("OneBitLamb", {{"max_coeff", 0.001}}),
                 "optimizer.params.max_coeff: must be >= min_coeff, got 0.001"));
  CHECK(contains(err("OneBitLamb", {{"min_coeff", 20}}),
                 "optimizer.params.max_coeff: must be >= min_coeff, got 10 (the default)"));
  CHECK(contains(err("OneBitLamb", {{"factor_max", 0.1}}),
                 "optimizer.params.factor_max: must be finite and >= factor_min, got 0.1"));
  // 1-bit LAMB needs dynamic loss scaling, as Lamb does.
  CHECK(contains(bad({{"fp16", {{"enabled", true}, {"loss_scale", 128}}}, {"optimizer", {{"type", "OneBitLamb"}}}}),
                 "fp16.loss_scale: optimizer \"OneBitLamb\" requires dynamic loss scaling"));
  // The frozen trust-ratio average needs about 1 / (1 - coeff_beta) warm-up steps.
  const ds::config c =
      good({{"fp16", {{"enabled", true}}}, {"optimizer", {{"type", "OneBitLamb"}, {"params", {{"freeze_step", 5}}}}}});
  CHECK(contains(joined(c.warnings), "optimizer.params.coeff_beta: 1 / (1 - coeff_beta) = 10 exceeds freeze_step 5"));
  CHECK(
      good({{"fp16", {{"enabled", true}}}, {"optimizer", {{"type", "OneBitLamb"}, {"params", {{"freeze_step", 10}}}}}})
          .warnings.empty());
}

TEST_CASE("deepspeed dispatch: fp16 OneBitAdam reaches mpopt::onebit::optimizer, constructs and steps") {
  const ds::config c = good({{"fp16", {{"enabled", true}, {"initial_scale_power", 10}}},
                             {"optimizer", {{"type", "OneBitAdam"}, {"params", {{"lr", 0.01}, {"freeze_step", 4}}}}},
                             {"gradient_clipping", 0.0}});
  using rules = decltype(std::tuple_cat(ds::default_rules{}, ds::default_onebit_rules{}));
  int calls = 0;
  std::vector<mpopt::half_t> params(8, mpopt::half_t(1.f));
  std::vector<mpopt::half_t> grads(8, mpopt::half_t(1024.f));  // gradient 1 at scale 2^10
  const mpopt::status s = ds::dispatch<mpopt::supported_precisions, rules>(c, [&](auto tag) {
    using opt_t = typename decltype(tag)::type;
    ++calls;
    CHECK(ds::is_onebit_optimizer_v<opt_t>);
    if constexpr (std::is_same_v<opt_t, mpopt::onebit::optimizer<mpopt::onebit_adam, mpopt::fp16_mixed_policy,
                                                                 mpopt::dynamic_scaler>>) {
      mpopt::param_group<typename opt_t::rule_type, typename opt_t::precision_type> g;
      g.params = params.data();
      g.grads = grads.data();
      g.size = params.size();
      g.hparams = ds::rule_args<typename opt_t::rule_type>(c);
      opt_t opt({g}, ds::scaler_args<ds::scaler_of_t<opt_t>>(c), ds::step_options_of(c), ds::onebit_options_of(c));
      CHECK(opt.loss_scale() == 1024.0);
      CHECK(opt.hparams(0).freeze_step == 4);
      CHECK(opt.next_phase() == mpopt::onebit::phase::warmup);
      CHECK(opt.step().applied);
      CHECK(opt.step_count() == 1);
    } else {
      FAIL("dispatched to another type");
    }
  });
  INFO(s.message);
  REQUIRE(s.ok());
  CHECK(calls == 1);
  // Adam without bias correction: m / sqrt(v) = 0.1 / sqrt(0.001) after one step of a constant gradient.
  CHECK(float(params[0]) == doctest::Approx(1.0 - 0.01 * 0.1 / std::sqrt(0.001)).epsilon(1e-3));

  // The 1-bit rule alone, with the fp16 policy alone, is enough; the classic rules are not needed.
  int alone = 0;
  CHECK(ds::dispatch<std::tuple<mpopt::fp16_mixed_policy>, std::tuple<mpopt::onebit_adam>>(c, [&](auto) {
          ++alone;
        }).ok());
  CHECK(alone == 1);
  // A precision outside the compiled set is named.
  const mpopt::status sp =
      ds::dispatch<std::tuple<mpopt::bf16_mixed_policy>, ds::default_onebit_rules>(c, [](auto) { FAIL("called"); });
  CHECK(sp.code == mpopt::errc::unsupported);
  CHECK(contains(sp.message, "Precisions"));
  // fp32 OneBitLamb: onebit::optimizer<onebit_lamb, fp32_policy, no_scaler>.
  const ds::config l = good({{"optimizer", {{"type", "OneBitLamb"}}}});
  bool fp32 = false;
  CHECK(ds::dispatch<mpopt::supported_precisions, rules>(l, [&](auto tag) {
          fp32 = std::is_same_v<typename decltype(tag)::type,
                                mpopt::onebit::optimizer<mpopt::onebit_lamb, mpopt::fp32_policy, mpopt::no_scaler>>;
        }).ok());
  CHECK(fp32);
  // A hand-made config no valid 1-bit config gives (fp32 with a dynamic scaler) is refused, naming the type.
  ds::config odd = l;
  odd.scaler.kind = ds::scaler_kind::dynamic;
  const mpopt::status so = ds::dispatch<mpopt::supported_precisions, rules>(odd, [](auto) { FAIL("called"); });
  CHECK(so.code == mpopt::errc::unsupported);
  CHECK(contains(so.message, "mpopt::onebit::optimizer<mpopt::onebit_lamb"));
  CHECK(contains(so.message, "not a combination a valid 1-bit config selects"));
}

TEST_CASE("deepspeed dispatch: bf16 ZeroOneAdam warns and opts in to the unverified precision") {
  const ds::config c = good({{"bf16", {{"enabled", true}}},
                             {"optimizer", {{"type", "ZeroOneAdam"}, {"params", {{"lr", 0.01}}}}},
                             {"zero_optimization", {{"reduce_bucket_size", 4096}}}});
  const std::string w = joined(c.warnings);
  CHECK(contains(w,
                 "optimizer.type: the convergence of 1-bit Adam / 0/1 Adam / 1-bit Lamb (\"ZeroOneAdam\") is "
                 "only verified under fp16"));
  CHECK(contains(w, "Running it in bf16 as DeepSpeed does"));
  CHECK(contains(w, "accept_unverified_precision"));
  CHECK(c.optimizer.accept_unverified_precision);
  const mpopt::onebit::options o = ds::onebit_options_of(c);
  CHECK(o.accept_unverified_precision);
  CHECK(o.bucket_elements == 4096);
  CHECK(ds::to_json(c)["optimizer"]["accept_unverified_precision"] == true);

  std::vector<mpopt::bf16_t> params(8, mpopt::bf16_t(1.f));
  std::vector<mpopt::bf16_t> grads(8, mpopt::bf16_t(0.5f));
  int calls = 0;
  const mpopt::status s = ds::dispatch<mpopt::supported_precisions, ds::default_onebit_rules>(c, [&](auto tag) {
    using opt_t = typename decltype(tag)::type;
    ++calls;
    if constexpr (std::is_same_v<opt_t, mpopt::onebit::optimizer<mpopt::zero_one_adam, mpopt::bf16_mixed_policy,
                                                                 mpopt::no_scaler>>) {
      mpopt::param_group<typename opt_t::rule_type, typename opt_t::precision_type> g;
      g.params = params.data();
      g.grads = grads.data();
      g.size = params.size();
      g.hparams = ds::rule_args<typename opt_t::rule_type>(c);
      const auto scaler = ds::scaler_args<ds::scaler_of_t<opt_t>>(c);
      // mpopt's C++ API refuses bf16 unless opted in; the config's opt-in lets it run.
      CHECK_THROWS_WITH_AS(opt_t({g}, scaler, ds::step_options_of(c)), doctest::Contains("accept_unverified_precision"),
                           mpopt::error);
      opt_t opt({g}, scaler, ds::step_options_of(c), ds::onebit_options_of(c));
      CHECK(opt.step().applied);
    } else {
      FAIL("dispatched to another type");
    }
  });
  INFO(s.message);
  REQUIRE(s.ok());
  CHECK(calls == 1);
  CHECK(float(params[0]) < 1.f);
}

TEST_CASE("deepspeed config: OneBitLamb with ZeRO stage 1 is refused") {
  const std::string e = bad(
      {{"fp16", {{"enabled", true}}}, {"optimizer", {{"type", "OneBitLamb"}}}, {"zero_optimization", {{"stage", 1}}}});
  CHECK(contains(e,
                 "optimizer.type: \"OneBitLamb\" is not compatible with ZeRO (zero_optimization.stage 1); use "
                 "zero_optimization.stage 0"));
  // Not also the untested-optimizer error: the 1-bit refusal says it all.
  CHECK_FALSE(contains(e, "zero_allow_untested_optimizer"));
}

TEST_CASE("deepspeed config: Lamb requires dynamic loss scaling") {
  const std::string e = bad({{"optimizer", {{"type", "Lamb"}}}, {"fp16", {{"enabled", true}, {"loss_scale", 128}}}});
  CHECK(contains(e, "fp16.loss_scale"));
  CHECK(contains(e, "requires dynamic loss scaling"));
}

TEST_CASE("deepspeed config: master-weight modes of DeepSpeed #7700") {
  const json z2 = {{"stage", 2}};
  const ds::config full =
      good({{"bf16", {{"enabled", true}, {"bf16_master_weights_and_grads", true}, {"bf16_optimizer_states", true}}},
            {"zero_optimization", z2}});
  CHECK(full.precision.param == mpopt::dtype::bf16);
  CHECK(full.precision.master == mpopt::dtype::bf16);
  CHECK(full.precision.grad == mpopt::dtype::bf16);
  CHECK(full.precision.state == mpopt::dtype::bf16);
  CHECK(full.scaler.kind == ds::scaler_kind::none);

  const ds::config m = good({{"bf16", {{"enabled", true}, {"bf16_master_weights_and_grads", true}}},
                             {"zero_optimization", {{"stage", 1}, {"offload_optimizer", {{"device", "cpu"}}}}}});
  CHECK(m.precision.master == mpopt::dtype::bf16);
  CHECK(m.precision.state == mpopt::dtype::fp32);
  CHECK(m.zero.offload_optimizer.device == "cpu");
  CHECK(m.warnings.empty());
  const mpopt::status off = ds::dispatch(m, [](auto) {});
  CHECK(off.code == mpopt::errc::unsupported);  // offload: recorded, not available yet

  const ds::config h =
      good({{"fp16", {{"enabled", true}, {"fp16_master_weights_and_grads", true}}}, {"zero_optimization", z2}});
  CHECK(h.precision.master == mpopt::dtype::fp16);
  CHECK(h.precision.state == mpopt::dtype::fp32);
  CHECK(contains(joined(h.warnings), "DeepSpeedCPUAdam"));  // DeepSpeed needs offload; mpopt does not

  CHECK(contains(bad({{"bf16", {{"enabled", true}, {"bf16_optimizer_states", true}}}, {"zero_optimization", z2}}),
                 "bf16.bf16_optimizer_states: requires bf16.bf16_master_weights_and_grads"));
  const std::string s0 = bad({{"bf16", {{"enabled", true}, {"bf16_master_weights_and_grads", true}}}});
  CHECK(contains(s0, "bf16.bf16_master_weights_and_grads: true is only supported with ZeRO stage 1, 2 or 3"));
  CHECK(contains(bad({{"fp16", {{"enabled", true}, {"fp16_master_weights_and_grads", true}}}}),
                 "fp16.fp16_master_weights_and_grads: true is only supported with ZeRO stage"));
  CHECK(contains(
      bad({{"bf16", {{"enabled", false}, {"bf16_master_weights_and_grads", true}}}, {"zero_optimization", z2}}),
      "requires bf16.enabled true"));
  CHECK(contains(bad({{"fp16", {{"enabled", true}, {"fp16_master_weights_and_grads", true}}},
                      {"bf16", {{"bf16_master_weights_and_grads", true}}},
                      {"zero_optimization", z2}}),
                 "mutually exclusive"));
}

TEST_CASE("deepspeed config: optimizer.params.max_grad_norm is refused in favour of gradient_clipping") {
  for (const json& prec : {json{{"fp16", {{"enabled", true}}}}, json{{"bf16", {{"enabled", true}}}}, json::object()}) {
    json j = prec;
    j["optimizer"] = {{"type", "Adam"}, {"params", {{"lr", 1e-3}, {"max_grad_norm", 1.0}}}};
    const std::string e = bad(j);
    CHECK(contains(e, "optimizer.params.max_grad_norm"));
    CHECK(contains(e, "\"gradient_clipping\": 1"));
  }
}

TEST_CASE("deepspeed config: gradient_clipping is honoured, 0 disables") {
  CHECK(good({{"gradient_clipping", 0.5}}).gradient_clipping == 0.5);
  CHECK(good({{"gradient_clipping", 0.0}}).gradient_clipping == 0.0);
  CHECK(ds::step_options_of(good({{"gradient_clipping", 0.0}})).max_grad_norm == 0.0);
  CHECK(contains(bad({{"gradient_clipping", -1}}), "gradient_clipping: must be >= 0"));
}

TEST_CASE("deepspeed config: unknown keys are errors in strict sections, warnings elsewhere") {
  CHECK(contains(bad({{"fp16", {{"enabled", true}, {"loss_scael", 0}}}}), "fp16.loss_scael: unknown key"));
  CHECK(contains(bad({{"bf16", {{"enable", true}}}}), "bf16.enable: unknown key"));
  CHECK(contains(bad({{"optimizer", {{"type", "AdamW"}, {"params", {{"foreach", true}}}}}}),
                 "optimizer.params.foreach: unknown parameter"));
  const ds::config c = good(
      {{"train_batch_size", 32}, {"my_key", 1}, {"zero_optimization", {{"overlap_comm", true}, {"stage_four", 1}}}});
  CHECK(joined(c.warnings) == "my_key: unknown key, ignored\nzero_optimization.stage_four: unknown key, ignored\n");
  CHECK(contains(bad({{"optimizer", {{"type", "Adafactor"}}}}), "optimizer.type: unknown optimizer \"Adafactor\""));
  CHECK(contains(bad({{"zero_optimization", {{"stage", 4}}}}), "zero_optimization.stage: must be 0, 1, 2 or 3, got 4"));
}

TEST_CASE("deepspeed config: optimizer mapping follows DeepSpeed's defaults") {
  // "Adam" is AdamW-style decoupled decay unless adam_w_mode is false (FusedAdam defaults: wd 0, eps 1e-8).
  const ds::config a = good({{"optimizer", {{"type", "Adam"}, {"params", {{"lr", 3e-4}, {"betas", {0.8, 0.95}}}}}}});
  CHECK(a.optimizer.name == "adamw");
  CHECK(a.optimizer.adam_args.lr == 3e-4);
  CHECK(a.optimizer.adam_args.beta1 == 0.8);
  CHECK(a.optimizer.adam_args.beta2 == 0.95);
  CHECK(a.optimizer.adam_args.eps == 1e-8);
  CHECK(a.optimizer.adam_args.weight_decay == 0.0);
  const mpopt::adamw::args w = ds::rule_args<mpopt::adamw>(a);
  CHECK(w.lr == 3e-4);
  CHECK(w.weight_decay == 0.0);
  CHECK(w.adam_w_mode);
  CHECK(good({{"optimizer", {{"type", "adam"}, {"params", {{"adam_w_mode", false}}}}}}).optimizer.name == "adam");
  // torch_adam: torch.optim.AdamW, weight_decay 0.01.
  CHECK(
      good({{"optimizer", {{"type", "AdamW"}, {"params", {{"torch_adam", true}}}}}}).optimizer.adam_args.weight_decay ==
      0.01);
  // "auto" means the default.
  CHECK(good({{"optimizer", {{"type", "AdamW"}, {"params", {{"lr", "auto"}}}}}}).optimizer.adam_args.lr == 1e-3);
  CHECK(good({{"optimizer", {{"type", "Lion"}}}}).optimizer.lion_args.lr == 1e-3);
  CHECK(good({{"optimizer", {{"type", "Lamb"}}}}).optimizer.lamb_args.eps == 1e-8);
  const ds::config s = good({{"optimizer", {{"type", "SGD"}, {"params", {{"lr", 0.1}, {"momentum", 0.9}}}}}});
  CHECK(ds::rule_args<mpopt::sgd>(s).momentum == 0.9);
  CHECK(contains(bad({{"optimizer", {{"type", "AdamW"}, {"params", {{"lr", -1}}}}}}), "optimizer.params: "));
}

TEST_CASE("deepspeed config: data_types.grad_accum_dtype is the optimizer's grad dtype, at any ZeRO stage") {
  const ds::config c = good({{"bf16", {{"enabled", true}}},
                             {"zero_optimization", {{"stage", 1}}},
                             {"data_types", {{"grad_accum_dtype", "fp32"}}},
                             {"optimizer", {{"type", "AdamW"}}}});
  CHECK(c.precision.grad_accum == mpopt::dtype::fp32);
  CHECK(c.precision.grad == mpopt::dtype::bf16);  // the micro-batch grads: the model's dtype
  CHECK(ds::optimizer_grad_dtype(c.precision) == mpopt::dtype::fp32);
  CHECK(c.warnings.empty());
  CHECK(ds::availability(c).ok());
  CHECK(ds::optimizer_type_name(c) ==
        "mpopt::optimizer<mpopt::adamw, mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, "
        "mpopt::grad<float>, mpopt::state<float>>, mpopt::no_scaler>");
  int calls = 0;
  CHECK(ds::dispatch(c, [&](auto tag) {
          ++calls;
          CHECK(std::is_same_v<typename decltype(tag)::type,
                               mpopt::optimizer<mpopt::adamw, mpopt::precision_of<mpopt::bf16_t, float, float, float>,
                                                mpopt::no_scaler>>);
        }).ok());
  CHECK(calls == 1);
  const json g = ds::to_json(c)["grad_accumulation"];
  CHECK(g["micro_batch_grad"] == "bf16");
  CHECK(g["accum"] == "fp32");
  CHECK(g["optimizer_grad"] == "fp32");
  CHECK(g["separate_buffer"] == true);
  CHECK(ds::to_json(good({{"bf16", {{"enabled", true}}}}))["grad_accumulation"]["separate_buffer"] == false);

  // fp16 with an fp32 accumulation at stage 2: the loss scaler stays, the grads the optimizer reads are fp32.
  const ds::config h = good({{"fp16", {{"enabled", true}}},
                             {"zero_optimization", {{"stage", 2}}},
                             {"data_types", {{"grad_accum_dtype", "torch.float32"}}},
                             {"optimizer", {{"type", "Adam"}}}});
  calls = 0;
  CHECK(ds::dispatch(h, [&](auto tag) {
          ++calls;
          CHECK(std::is_same_v<typename decltype(tag)::type,
                               mpopt::optimizer<mpopt::adamw, mpopt::precision_of<mpopt::half_t, float, float, float>,
                                                mpopt::dynamic_scaler>>);
        }).ok());
  CHECK(calls == 1);
  // Accumulating bf16 grads of an fp32 model is accepted too (DeepSpeed's ZeRO accepts all 12 mixes).
  CHECK(ds::optimizer_type_name(good({{"zero_optimization", {{"stage", 2}}},
                                      {"data_types", {{"grad_accum_dtype", "bf16"}}},
                                      {"optimizer", {{"type", "AdamW"}}}})) ==
        "mpopt::optimizer<mpopt::adamw, mpopt::precision<mpopt::param<float>, mpopt::master<float>, "
        "mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>, mpopt::no_scaler>");

  // Without ZeRO DeepSpeed raises NotImplementedError; mpopt accumulates at any stage and says it differs.
  const ds::config s0 = good({{"bf16", {{"enabled", true}}},
                              {"data_types", {{"grad_accum_dtype", "fp32"}}},
                              {"optimizer", {{"type", "SGD"}, {"params", {{"lr", 1.0}}}}},
                              {"gradient_clipping", 0.0}});
  CHECK(joined(s0.warnings) ==
        "data_types.grad_accum_dtype: fp32 with a bf16 model at zero_optimization.stage 0: DeepSpeed refuses this "
        "mix without ZeRO (NotImplementedError); mpopt accumulates in any dtype at any stage (sum the micro-batch "
        "grads into a fp32 buffer, mpopt/grad_accumulation.hpp)\n");

  CHECK(contains(bad({{"bf16", {{"enabled", true}}}, {"data_types", {{"param_dtype", "fp16"}}}}),
                 "data_types.param_dtype"));
  CHECK(contains(bad({{"data_types", {{"grad_accum_dtype", "fp8"}}}}), "data_types.grad_accum_dtype: must be"));
}

TEST_CASE("deepspeed dispatch: an fp32 accumulation of bf16 micro-batch grads keeps what bf16 would drop") {
  const ds::config c = good({{"bf16", {{"enabled", true}}},
                             {"data_types", {{"grad_accum_dtype", "fp32"}}},
                             {"optimizer", {{"type", "SGD"}, {"params", {{"lr", 1.0}}}}},
                             {"gradient_clipping", 0.0}});
  // Two micro-batches of bf16 grads. The second's parts are a quarter of a bf16 ulp of the first's, so a bf16 sum
  // drops them; their fp32 sum is exact (hand-computed: 1 + 2^-9, -2 + 2^-9, 0.5 - 2^-11, 3 + 2^-8).
  const float micro1[4] = {1.f, -2.f, 0.5f, 3.f};
  const float micro2[4] = {0x1p-9f, 0x1p-9f, -0x1p-11f, 0x1p-8f};
  const double sum[4] = {1.001953125, -1.998046875, 0.49951171875, 3.00390625};
  std::vector<mpopt::bf16_t> params(4, mpopt::bf16_t(0.f));
  std::vector<float> accum(4, 0.f);  // the caller's accumulation buffer, in grad_accum_dtype
  for (int i = 0; i < 4; ++i) {
    accum[i] += float(mpopt::bf16_t(micro1[i]));
    accum[i] += float(mpopt::bf16_t(micro2[i]));
    REQUIRE(double(accum[i]) == sum[i]);
    CHECK(float(mpopt::bf16_t(float(mpopt::bf16_t(micro1[i])) + float(mpopt::bf16_t(micro2[i])))) == micro1[i]);
  }
  int calls = 0;
  const mpopt::status s = ds::dispatch(c, [&](auto tag) {
    using opt_t = typename decltype(tag)::type;
    ++calls;
    if constexpr (std::is_same_v<opt_t,
                                 mpopt::optimizer<mpopt::sgd, mpopt::precision_of<mpopt::bf16_t, float, float, float>,
                                                  mpopt::no_scaler>>) {
      mpopt::param_group<typename opt_t::rule_type, typename opt_t::precision_type> g;
      g.params = params.data();
      g.grads = accum.data();  // the optimizer reads the fp32 accumulation
      g.size = params.size();
      g.hparams = ds::rule_args<typename opt_t::rule_type>(c);
      opt_t opt({g}, ds::scaler_args<typename opt_t::scaler_type>(c), ds::step_options_of(c));
      REQUIRE(opt.step().applied);
      for (int i = 0; i < 4; ++i) {
        CAPTURE(i);
        CHECK(double(opt.master(0)[i]) == -sum[i]);  // w = 0 - lr * sum, exact in the fp32 master
        CHECK(float(params[i]) == -micro1[i]);       // the bf16 param copy rounds the small part away
      }
    } else {
      FAIL("dispatched to another type");
    }
  });
  INFO(s.message);
  REQUIRE(s.ok());
  CHECK(calls == 1);
}

TEST_CASE("deepspeed config: the 1-bit optimizers refuse a grad_accum_dtype other than the model dtype") {
  for (const char* t : {"OneBitAdam", "ZeroOneAdam", "OneBitLamb"}) {
    CAPTURE(t);
    const std::string e = bad(
        {{"fp16", {{"enabled", true}}}, {"data_types", {{"grad_accum_dtype", "fp32"}}}, {"optimizer", {{"type", t}}}});
    CHECK(contains(e, "data_types.grad_accum_dtype: fp32 differs from the model dtype fp16; optimizer \"" +
                          std::string(t) + "\" takes its grads in the model dtype"));
    CHECK(contains(e, "Remove data_types.grad_accum_dtype, or set it to \"fp16\""));
    good({{"fp16", {{"enabled", true}}}, {"data_types", {{"grad_accum_dtype", "fp16"}}}, {"optimizer", {{"type", t}}}});
  }
}

TEST_CASE("deepspeed config: torch_autocast") {
  const ds::config c = good({{"torch_autocast", {{"enabled", true}, {"dtype", "torch.bfloat16"}}}});
  CHECK(c.torch_autocast.dtype == "bf16");
  CHECK(contains(joined(good({{"torch_autocast", {{"enabled", true}}}}).warnings), "torch_autocast.dtype"));
  CHECK(contains(bad({{"torch_autocast", {{"dtype", "int8"}}}}), "torch_autocast.dtype"));
}

TEST_CASE("deepspeed dispatch: a config reaches the compiled optimizer, or names what is missing") {
  const ds::config c = good({{"fp16", {{"enabled", true}, {"initial_scale_power", 10}}},
                             {"optimizer", {{"type", "AdamW"}, {"params", {{"lr", 0.1}, {"weight_decay", 0.0}}}}},
                             {"gradient_clipping", 0.0}});
  using precs = std::tuple<mpopt::fp16_mixed_policy, mpopt::bf16_mixed_policy>;
  using rules = std::tuple<mpopt::adamw, mpopt::sgd>;
  using scalers = std::tuple<mpopt::dynamic_scaler>;
  int calls = 0;
  double scale = 0;
  std::vector<mpopt::half_t> params(4, mpopt::half_t(1.f));
  const mpopt::status s = ds::dispatch<precs, rules, scalers>(c, [&](auto tag) {
    using opt_t = typename decltype(tag)::type;
    using rule_t = typename opt_t::rule_type;
    using prec_t = typename opt_t::precision_type;
    ++calls;
    if constexpr (std::is_same_v<prec_t, mpopt::fp16_mixed_policy> && std::is_same_v<rule_t, mpopt::adamw>) {
      std::vector<mpopt::half_t> grads(4, mpopt::half_t(1024.f));  // gradient 1 at scale 2^10
      mpopt::param_group<rule_t, prec_t> g;
      g.params = params.data();
      g.grads = grads.data();
      g.size = params.size();
      g.hparams = ds::rule_args<rule_t>(c);
      opt_t opt({g}, ds::scaler_args<typename opt_t::scaler_type>(c), ds::step_options_of(c));
      scale = opt.loss_scale();
      CHECK(opt.step().applied);
    }
  });
  REQUIRE(s.ok());
  CHECK(calls == 1);
  CHECK(scale == 1024.0);
  CHECK(float(params[0]) == doctest::Approx(0.9).epsilon(1e-3));  // Adam's first step moves by lr

  // A bf16-states config is not in `precs`.
  const ds::config b =
      good({{"bf16", {{"enabled", true}, {"bf16_master_weights_and_grads", true}, {"bf16_optimizer_states", true}}},
            {"zero_optimization", {{"stage", 2}}},
            {"optimizer", {{"type", "AdamW"}}}});
  const mpopt::status sb = ds::dispatch<precs, rules, std::tuple<mpopt::no_scaler>>(b, [](auto) { FAIL("called"); });
  CHECK(sb.code == mpopt::errc::unsupported);
  CHECK(contains(sb.message, "mpopt::state<mpopt::bf16_t>"));
  CHECK(contains(sb.message, "Precisions"));
  CHECK(ds::dispatch(b, [](auto) {}).ok());  // the default set has it
  const mpopt::status sl = ds::dispatch<precs, rules, scalers>(good({{"optimizer", {{"type", "Lion"}}}}), [](auto) {});
  CHECK(contains(sl.message, "rule mpopt::lion"));
  const mpopt::status sn = ds::dispatch<precs, rules, scalers>(good({{"optimizer", {{"type", "SGD"}}}}), [](auto) {});
  CHECK(contains(sn.message, "mpopt::no_scaler is not in the compiled set"));
  CHECK(ds::dispatch(good(json::object()), [](auto) {}).code == mpopt::errc::unsupported);  // no optimizer section
}

TEST_CASE("deepspeed config: load_config throws mpopt::error listing the errors") {
  CHECK_THROWS_WITH_AS(ds::load_config({{"fp16", {{"enabled", true}}}, {"bf16", {{"enabled", true}}}}),
                       doctest::Contains("fp16.enabled and bf16.enabled"), mpopt::error);
  CHECK(ds::to_json(ds::load_config(json::object()))["gradient_clipping"] == 1.0);
}

TEST_CASE("deepspeed config: Muon's defaults are DeepSpeed's MuonWithAuxAdam's") {
  const ds::config c = good({{"optimizer", {{"type", "Muon"}}}, {"zero_optimization", {{"stage", 2}}}});
  CHECK(c.optimizer.name == "muon");
  CHECK(c.warnings.empty());
  const mpopt::muon::args m = ds::muon_args_of(c);
  CHECK(m.lr == 0.02);
  CHECK(m.momentum == 0.95);
  CHECK(m.weight_decay == 0.0);
  CHECK(m.nesterov);       // muon_update's nesterov=True
  CHECK(m.ns_steps == 5);  // and ns_steps=5
  CHECK(m.ns_coefficients.a == 3.4445);
  CHECK(m.ns_coefficients.b == -4.7750);
  CHECK(m.ns_coefficients.c == 2.0315);
  CHECK(m.adjust_lr == mpopt::muon_adjust_lr::original);  // update *= sqrt(max(1, rows / cols))
  CHECK(m.eps == 1e-7);
  CHECK(c.optimizer.ns_method == "gram");
  CHECK(ds::rule_args<mpopt::muon>(c).lr == 0.02);
  const mpopt::adamw::args a = ds::muon_aux_args_of(c);
  CHECK(a.lr == 3e-4);
  CHECK(a.beta1 == 0.9);
  CHECK(a.beta2 == 0.95);
  CHECK(a.eps == 1e-10);
  CHECK(a.weight_decay == 0.0);
  CHECK(a.bias_correction);  // adam_update divides by 1 - beta^step
  CHECK(a.adam_w_mode);      // p.mul_(1 - lr * weight_decay)
  CHECK_FALSE(a.amsgrad);

  const json o = ds::to_json(c)["optimizer"];
  CHECK(o["muon"]["lr"] == 0.02);
  CHECK(o["muon"]["ns_method"] == "gram");
  CHECK(o["muon"]["ns_iteration"] == "standard");
  CHECK(o["muon"]["ns_coefficients"] == json({3.4445, -4.7750, 2.0315}));
  CHECK(o["muon"]["nesterov"] == true);
  CHECK(o["aux_adamw"]["lr"] == 3e-4);
  CHECK(o["aux_adamw"]["betas"] == json({0.9, 0.95}));
  CHECK(o["aux_adamw"]["eps"] == 1e-10);
  CHECK_FALSE(o.contains("params"));
  CHECK(ds::optimizer_type_name(c) ==
        "mpopt::muon_optimizer<mpopt::precision<mpopt::param<float>, mpopt::master<float>, mpopt::grad<float>, "
        "mpopt::state<float>>, mpopt::no_scaler, mpopt::muon_gemm<float>>");
}

TEST_CASE("deepspeed config: Muon's lr, muon_lr, adam_lr and weight_decay go to the groups as in DeepSpeed") {
  auto muon = [](const json& params) {
    return good({{"optimizer", {{"type", "Muon"}, {"params", params}}}, {"zero_optimization", {{"stage", 2}}}});
  };
  // DeepSpeed's tests/unit/ops/muon/test_muon_partial_training.py: (params) -> (muon lr, adam lr).
  const ds::config a = muon({{"lr", 0.02}, {"weight_decay", 0.01}});
  CHECK(ds::muon_args_of(a).lr == 0.02);
  CHECK(ds::muon_aux_args_of(a).lr == 0.02);
  CHECK(ds::muon_args_of(a).weight_decay == 0.01);
  CHECK(ds::muon_aux_args_of(a).weight_decay == 0.01);
  const ds::config b = muon({{"lr", 0.02}, {"muon_lr", 0.04}, {"adam_lr", 0.001}, {"weight_decay", 0.01}});
  CHECK(ds::muon_args_of(b).lr == 0.04);
  CHECK(ds::muon_aux_args_of(b).lr == 0.001);
  // The overrides alone; momentum to the matrices; betas and eps to the others; ns_method recorded.
  const ds::config c = muon({{"muon_lr", 0.05},
                             {"momentum", 0.9},
                             {"betas", {0.8, 0.99}},
                             {"eps", 1e-8},
                             {"ns_method", "standard"},
                             {"adam_lr", "auto"}});
  CHECK(ds::muon_args_of(c).lr == 0.05);
  CHECK(ds::muon_args_of(c).momentum == 0.9);
  CHECK(ds::muon_aux_args_of(c).lr == 3e-4);  // "auto": the default
  CHECK(ds::muon_aux_args_of(c).beta1 == 0.8);
  CHECK(ds::muon_aux_args_of(c).beta2 == 0.99);
  CHECK(ds::muon_aux_args_of(c).eps == 1e-8);
  CHECK(ds::muon_args_of(c).eps == 1e-7);  // eps is the AdamW's only
  CHECK(c.optimizer.ns_method == "standard");
  CHECK(ds::to_json(c)["optimizer"]["muon"]["ns_method"] == "standard");
  CHECK(c.warnings.empty());
}

TEST_CASE("deepspeed config: Muon's invalid parameters name the key and the value") {
  auto err = [](const json& params) {
    return bad({{"optimizer", {{"type", "Muon"}, {"params", params}}}, {"zero_optimization", {{"stage", 2}}}});
  };
  CHECK(contains(err({{"ns_method", "newton"}}),
                 "optimizer.params.ns_method: must be \"gram\" or \"standard\", got \"newton\""));
  CHECK(contains(err({{"momentum", 1.0}}), "optimizer.params.momentum: must be in [0, 1), got 1"));
  CHECK(contains(err({{"muon_lr", -1}}), "optimizer.params.muon_lr: must be finite and >= 0, got -1"));
  CHECK(contains(err({{"adam_lr", -2}}), "optimizer.params.adam_lr: must be finite and >= 0, got -2"));
  // A shared key is named once, for both groups.
  const std::string lr = err({{"lr", -1}});
  CHECK(lr == "optimizer.params.lr: must be finite and >= 0, got -1\n");
  // lr goes to the group whose override is not set.
  CHECK(err({{"lr", -1}, {"muon_lr", 0.02}}) == "optimizer.params.lr: must be finite and >= 0, got -1\n");
  CHECK(err({{"weight_decay", -0.5}}) == "optimizer.params.weight_decay: must be finite and >= 0, got -0.5\n");
  CHECK(contains(err({{"betas", {0.9, 1.5}}}), "optimizer.params.betas[1]: must be in [0, 1), got 1.5"));
  CHECK(contains(err({{"betas", {0.9}}}), "optimizer.params.betas: must be a list of two numbers"));
  CHECK(contains(err({{"eps", 0}}), "optimizer.params.eps: must be finite and > 0, got 0"));
  CHECK(contains(err({{"momentum", "x"}}), "optimizer.params.momentum: must be a number, got \"x\""));
  CHECK(contains(err({{"ns_method", 1}}), "optimizer.params.ns_method: must be a string, got 1"));
  CHECK(contains(err({{"max_grad_norm", 1.0}}), "\"gradient_clipping\": 1"));
  // Keys DeepSpeed drops silently (muon_update fixes nesterov and ns_steps) are errors, as for the other optimizers.
  for (const char* key : {"nesterov", "ns_steps", "amsgrad", "momentun"}) {
    CAPTURE(key);
    const std::string u = err({{key, 1}});
    CHECK(contains(u, std::string("optimizer.params.") + key +
                          ": unknown parameter for optimizer \"Muon\" (known: "
                          "adam_lr, betas, eps, lr, momentum, muon_lr, "
                          "ns_method, weight_decay)"));
    CHECK(contains(u, "drops the rest silently"));
  }
}

TEST_CASE("deepspeed config: Muon where DeepSpeed skips its update warns; at ZeRO stage 3 it is unsupported") {
  // DeepSpeed applies Muon inside its ZeRO optimizer only: without ZeRO, and under BF16_Optimizer (ZeRO 1, bf16,
  // fp32 accumulation), its MuonWithAuxAdam applies the raw gradients.
  const ds::config s0 = good({{"optimizer", {{"type", "Muon"}}}});
  CHECK(joined(s0.warnings) ==
        "optimizer.type: \"Muon\" at zero_optimization.stage 0: DeepSpeed applies the Muon update only inside its "
        "ZeRO optimizer (not without ZeRO), so its MuonWithAuxAdam steps the matrices with their raw gradients (no "
        "momentum, no Newton-Schulz). mpopt runs Muon; use zero_optimization.stage 2 to compare with DeepSpeed\n");
  CHECK(ds::availability(s0).ok());
  const ds::config b1 = good({{"bf16", {{"enabled", true}}},
                              {"data_types", {{"grad_accum_dtype", "fp32"}}},
                              {"zero_optimization", {{"stage", 1}}},
                              {"optimizer", {{"type", "Muon"}}}});
  CHECK(contains(joined(b1.warnings), "at zero_optimization.stage 1 with bf16 and data_types.grad_accum_dtype fp32"));
  CHECK(contains(joined(b1.warnings), "BF16_Optimizer"));
  for (int stage : {1, 2})
    CHECK(good({{"bf16", {{"enabled", true}}},
                {"zero_optimization", {{"stage", stage}}},
                {"optimizer", {{"type", "Muon"}}}})
              .warnings.empty());

  // DeepSpeed runs Muon at stage 3 (a valid config); mpopt::muon_optimizer does not.
  const ds::config s3 = good({{"zero_optimization", {{"stage", 3}, {"save_muon_momentum_buffer_in_memory", true}}},
                              {"optimizer", {{"type", "Muon"}}}});
  CHECK(s3.warnings.empty());  // a DeepSpeed key without effect here
  const mpopt::status a = ds::availability(s3);
  CHECK(a.code == mpopt::errc::unsupported);
  CHECK(a.message ==
        "zero_optimization.stage 3 with optimizer.type \"Muon\": mpopt::muon_optimizer keeps whole matrices and runs "
        "ZeRO stages 0-2 only; use zero_optimization.stage 2");
  using rules = decltype(std::tuple_cat(ds::default_rules{}, ds::default_muon_rules{}));
  const mpopt::status d = ds::dispatch<mpopt::supported_precisions, rules>(s3, [](auto) { FAIL("called"); });
  CHECK(d.code == mpopt::errc::unsupported);
  CHECK(d.message == a.message);
}

TEST_CASE("deepspeed dispatch: Muon reaches mpopt::muon_optimizer with the rule and precision it needs") {
  const ds::config c = good({{"bf16", {{"enabled", true}}},
                             {"zero_optimization", {{"stage", 2}}},
                             {"data_types", {{"grad_accum_dtype", "fp32"}}},
                             {"optimizer", {{"type", "Muon"}}}});
  using bf16_fp32_grads = mpopt::precision_of<mpopt::bf16_t, float, float, float>;
  // The default rules (written for mpopt::optimizer) lack it, and say where it is.
  const mpopt::status s = ds::dispatch(c, [](auto) { FAIL("called"); });
  CHECK(s.code == mpopt::errc::unsupported);
  CHECK(contains(s.message, "rule mpopt::muon (optimizer.type \"Muon\") is not in the compiled set"));
  CHECK(contains(s.message, "default_muon_rules"));
  int calls = 0;
  using rules = decltype(std::tuple_cat(ds::default_rules{}, ds::default_onebit_rules{}, ds::default_muon_rules{}));
  CHECK(ds::dispatch<mpopt::supported_precisions, rules>(c, [&](auto tag) {
          using opt_t = typename decltype(tag)::type;
          ++calls;
          CHECK(ds::is_muon_optimizer_v<opt_t>);
          CHECK_FALSE(ds::is_onebit_optimizer_v<opt_t>);
          CHECK(
              std::is_same_v<opt_t, mpopt::muon_optimizer<bf16_fp32_grads, mpopt::no_scaler, mpopt::muon_gemm<float>>>);
          CHECK(std::is_same_v<ds::scaler_of_t<opt_t>, mpopt::no_scaler>);
        }).ok());
  CHECK(calls == 1);
  CHECK(ds::optimizer_type_name(c) ==
        "mpopt::muon_optimizer<mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, "
        "mpopt::grad<float>, mpopt::state<float>>, mpopt::no_scaler, mpopt::muon_gemm<float>>");
  // bf16 GEMMs: muon_rule<muon_gemm<bf16_t>> in Rules instead of mpopt::muon.
  calls = 0;
  CHECK(
      ds::dispatch<std::tuple<bf16_fp32_grads>,
                   std::tuple<ds::muon_rule<mpopt::muon_gemm<mpopt::bf16_t>>>>(c, [&](auto tag) {
        ++calls;
        CHECK(
            std::is_same_v<typename decltype(tag)::type,
                           mpopt::muon_optimizer<bf16_fp32_grads, mpopt::no_scaler, mpopt::muon_gemm<mpopt::bf16_t>>>);
      }).ok());
  CHECK(calls == 1);
  // fp16 with dynamic loss scaling.
  const ds::config h =
      good({{"fp16", {{"enabled", true}}}, {"zero_optimization", {{"stage", 1}}}, {"optimizer", {{"type", "Muon"}}}});
  calls = 0;
  CHECK(ds::dispatch<mpopt::supported_precisions, ds::default_muon_rules>(h, [&](auto tag) {
          ++calls;
          CHECK(std::is_same_v<typename decltype(tag)::type,
                               mpopt::muon_optimizer<mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>>);
        }).ok());
  CHECK(calls == 1);
  // A hand-made all-fp64 config: muon_optimizer computes in fp32, so nothing is instantiated, and the status says so.
  ds::config f64 = c;
  f64.precision = {mpopt::dtype::fp64, mpopt::dtype::fp64, mpopt::dtype::fp64, mpopt::dtype::fp64, mpopt::dtype::fp64};
  const mpopt::status sf =
      ds::dispatch<mpopt::supported_precisions, ds::default_muon_rules>(f64, [](auto) { FAIL("called"); });
  CHECK(sf.code == mpopt::errc::unsupported);
  CHECK(contains(sf.message, "mpopt::muon_optimizer needs an fp32-compute precision policy"));
}

namespace {
// DeepSpeed's Muon step, in fp64: momentum.lerp_(g, 1 - beta); u = g.lerp(momentum, beta); X = u / ||u|| for a
// rank-1 u (one column), whose only singular value is then 1; the quintic maps it to f(f(f(f(f(1))))).
double quintic5() {
  double s = 1.0;
  for (int k = 0; k < 5; ++k) s = 3.4445 * s - 4.7750 * s * s * s + 2.0315 * s * s * s * s * s;
  return s;
}
}  // namespace

TEST_CASE("deepspeed dispatch: Muon from a config steps like DeepSpeed's MuonWithAuxAdam (fp64 reference)") {
  const ds::config c =
      good({{"zero_optimization", {{"stage", 2}}},
            {"optimizer",
             {{"type", "Muon"},
              {"params",
               {{"lr", 0.01}, {"muon_lr", 0.05}, {"weight_decay", 0.1}, {"adam_lr", 0.002}, {"betas", {0.8, 0.99}}}}}},
            {"gradient_clipping", 0.0}});
  // A 4 x 1 matrix (Muon scales its lr by sqrt(4 / 1) = 2) and two aux elements; two steps with different grads.
  std::vector<float> w = {1.f, -0.5f, 0.25f, 2.f}, aux = {0.5f, -0.5f};
  const std::vector<float> g1 = {1.f, 2.f, 2.f, 4.f}, g2 = {4.f, -2.f, 2.f, 1.f};
  const std::vector<float> a1 = {0.25f, -4.f}, a2 = {-1.f, -3.f};
  std::vector<float> grads = g1, agrads = a1;

  // The reference, in double.
  std::vector<double> rw(w.begin(), w.end()), ra(aux.begin(), aux.end()), buf(4, 0.0), m(2, 0.0), v(2, 0.0);
  const double mlr = 0.05, alr = 0.002, wd = 0.1, beta = 0.95, b1 = 0.8, b2 = 0.99, eps = 1e-10;
  for (int step = 1; step <= 2; ++step) {
    const std::vector<float>& g = step == 1 ? g1 : g2;
    const std::vector<float>& ag = step == 1 ? a1 : a2;
    std::vector<double> u(4);
    double norm = 0;
    for (int i = 0; i < 4; ++i) {
      buf[i] += (1 - beta) * (g[i] - buf[i]);
      u[i] = g[i] + beta * (buf[i] - g[i]);
      norm += u[i] * u[i];
    }
    norm = std::sqrt(norm);
    for (int i = 0; i < 4; ++i) rw[i] = rw[i] * (1 - mlr * wd) - mlr * 2.0 * quintic5() * u[i] / norm;
    for (int i = 0; i < 2; ++i) {
      m[i] += (1 - b1) * (ag[i] - m[i]);
      v[i] += (1 - b2) * (ag[i] * ag[i] - v[i]);
      const double mh = m[i] / (1 - std::pow(b1, step)), vh = v[i] / (1 - std::pow(b2, step));
      ra[i] = ra[i] * (1 - alr * wd) - alr * mh / (std::sqrt(vh) + eps);
    }
  }

  int calls = 0;
  const mpopt::status s = ds::dispatch<std::tuple<mpopt::fp32_policy>, ds::default_muon_rules>(c, [&](auto tag) {
    using opt_t = typename decltype(tag)::type;
    ++calls;
    if constexpr (std::is_same_v<opt_t, mpopt::muon_optimizer<mpopt::fp32_policy, mpopt::no_scaler>>) {
      typename opt_t::matrix_group_type mg{w.data(), grads.data(), {{4, 1}}, ds::muon_args_of(c)};
      typename opt_t::aux_group_type ag;
      ag.params = aux.data();
      ag.grads = agrads.data();
      ag.size = aux.size();
      ag.hparams = ds::muon_aux_args_of(c);
      mpopt::comm::single_rank comm;
      opt_t opt({mg}, {ag}, comm, ds::zero_options_of(c), ds::scaler_args<ds::scaler_of_t<opt_t>>(c),
                ds::step_options_of(c));
      CHECK(opt.zero().stage == 2);
      REQUIRE(opt.step().applied);
      grads = g2;
      agrads = a2;
      REQUIRE(opt.step().applied);
    } else {
      FAIL("dispatched to another type");
    }
  });
  INFO(s.message);
  REQUIRE(s.ok());
  REQUIRE(calls == 1);
  // fp32 compute: within a few fp32 ulps of the fp64 reference (the weights move by ~0.1 and ~0.004).
  for (int i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(std::fabs(double(w[i]) - rw[i]) < 2e-6);
  }
  for (int i = 0; i < 2; ++i) {
    CAPTURE(i);
    CHECK(std::fabs(double(aux[i]) - ra[i]) < 1e-6);
  }
  // The update is not trivially small: the matrix moved by about lr * 2 per unit of the normalised update.
  CHECK(std::fabs(double(w[3]) - 2.0) > 0.05);
}
