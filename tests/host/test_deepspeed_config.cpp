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
  CHECK(ds::availability(good({{"optimizer", {{"type", "Muon"}}}})).code == mpopt::errc::unsupported);
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

TEST_CASE("deepspeed config: data_types.grad_accum_dtype") {
  const ds::config c = good({{"bf16", {{"enabled", true}}},
                             {"zero_optimization", {{"stage", 1}}},
                             {"data_types", {{"grad_accum_dtype", "fp32"}}},
                             {"optimizer", {{"type", "AdamW"}}}});
  CHECK(c.precision.grad_accum == mpopt::dtype::fp32);
  CHECK(c.precision.grad == mpopt::dtype::bf16);
  const mpopt::status s = ds::dispatch(c, [](auto) {});
  CHECK(s.code == mpopt::errc::unsupported);
  CHECK(contains(s.message, "data_types.grad_accum_dtype fp32"));
  // Without ZeRO DeepSpeed accumulates in the model dtype only.
  CHECK(contains(bad({{"bf16", {{"enabled", true}}}, {"data_types", {{"grad_accum_dtype", "fp32"}}}}),
                 "data_types.grad_accum_dtype: \"fp32\" differs from the model dtype bf16"));
  CHECK(contains(bad({{"bf16", {{"enabled", true}}}, {"data_types", {{"param_dtype", "fp16"}}}}),
                 "data_types.param_dtype"));
  CHECK(contains(bad({{"data_types", {{"grad_accum_dtype", "fp8"}}}}), "data_types.grad_accum_dtype: must be"));
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
