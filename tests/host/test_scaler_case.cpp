// mpopt-conformance's scaler mode: DeepSpeed ZeRO loss-scale trajectories from a list of overflow flags.
#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "conformance.hpp"

namespace {

using mpopt::conformance::run_scaler_case;
using nlohmann::json;

// The bad_input message for `c`, or "" when it does not throw.
std::string rejection(const json& c) {
  try {
    run_scaler_case(c);
  } catch (const mpopt::conformance::bad_input& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("scaler case D: init 2, min 1, hysteresis 1 raises on the second overflow") {
  const json out = run_scaler_case(json::parse(R"({"init_scale": 2, "min_scale": 1, "hysteresis": 1,
                                                   "overflow": [1, 1]})"));
  CHECK(out["scale_before"] == json::parse("[2.0, 1.0]"));
  CHECK(out["hysteresis_after"] == json::parse("[1]"));
  CHECK(out["raised_at"] == 1);
}

TEST_CASE("scaler case E: init 4, min 1, hysteresis 2: 4 (h1), 2, 1, raise") {
  const json out = run_scaler_case(json::parse(R"({"init_scale": 4, "hysteresis": 2,
                                                   "overflow": [true, true, true, true]})"));
  CHECK(out["scale_before"] == json::parse("[4, 4, 2, 1]"));
  CHECK(out["hysteresis_after"] == json::parse("[1, 1, 1]"));
  CHECK(out["raised_at"] == 3);
}

TEST_CASE("scaler case A with every default: ZeRO init 65536, window 1000, hysteresis 2, min 1") {
  const json out = run_scaler_case(json::parse(R"({"overflow": [1, 1, 1, 0, 1]})"));
  CHECK(out["scale_before"] == json::parse("[65536, 65536, 32768, 16384, 16384]"));
  CHECK(out["hysteresis_after"] == json::parse("[1, 1, 1, 1, 1]"));
  CHECK(out["raised_at"].is_null());
}

TEST_CASE("scaler cases C and F: consecutive hysteresis on and off, window 2") {
  const json c = run_scaler_case(json::parse(R"({"init_scale": 256, "scale_window": 2, "hysteresis": 2,
      "consecutive_hysteresis": true, "overflow": [1, 0, 1, 0, 1, 0, 1]})"));
  CHECK(c["scale_before"] == json::parse("[256, 256, 256, 256, 256, 256, 256]"));
  CHECK(c["hysteresis_after"] == json::parse("[1, 2, 1, 2, 1, 2, 1]"));
  const json f = run_scaler_case(json::parse(R"({"init_scale": 256, "scale_window": 2, "hysteresis": 2,
      "consecutive_hysteresis": false, "overflow": [1, 0, 0, 0, 1, 1]})"));
  CHECK(f["scale_before"] == json::parse("[256, 256, 256, 256, 512, 512]"));
  CHECK(f["hysteresis_after"] == json::parse("[1, 1, 1, 2, 1, 1]"));
  CHECK(f["raised_at"].is_null());
}

TEST_CASE("scaler case: an empty sequence gives empty lists") {
  const json out = run_scaler_case(json::parse(R"({"overflow": []})"));
  CHECK(out == json::parse(R"({"scale_before": [], "hysteresis_after": [], "raised_at": null})"));
}

TEST_CASE("scaler case: bad input names the key and the value") {
  CHECK(rejection(json::parse(R"({"overflow": [0, 2]})")) == "overflow[1]: expected 0, 1, true or false, got 2");
  CHECK(rejection(json::parse(R"({"overflow": [0, 1.0]})")) == "overflow[1]: expected 0, 1, true or false, got 1.0");
  CHECK(rejection(json::parse(R"({"overflow": ["1"]})")) == "overflow[0]: expected 0, 1, true or false, got \"1\"");
  CHECK(rejection(json::parse(R"({"overflow": 1})")) == "overflow: expected a list of 0/1 or true/false, got 1");
  CHECK(rejection(json::parse(R"({"init_scale": 4})")) ==
        "overflow: missing (the list of overflow flags, one per update)");
  CHECK(rejection(json::parse(R"({"loss_scale_window": 4, "overflow": []})")) ==
        "loss_scale_window: unknown key in the scaler case (known: init_scale, scale_window, min_scale, hysteresis, "
        "consecutive_hysteresis, overflow)");
  CHECK(rejection(json::parse(R"({"init_scale": "65536", "overflow": []})")) ==
        "init_scale: expected a number, got \"65536\"");
  CHECK(rejection(json::parse(R"({"init_scale": true, "overflow": []})")) == "init_scale: expected a number, got true");
  CHECK(rejection(json::parse(R"({"init_scale": 0.1, "overflow": []})")) ==
        "init_scale: 0.1 is not exactly representable as a float (the scale is kept in float)");
  CHECK(rejection(json::parse(R"({"scale_window": 2.5, "overflow": []})")) ==
        "scale_window: expected an integer, got 2.5");
  CHECK(rejection(json::parse(R"({"scale_window": 0, "overflow": []})")) ==
        "dynamic_scale_args.scale_window must be > 0, got 0");
  CHECK(rejection(json::parse(R"({"hysteresis": 4294967296, "overflow": []})")) ==
        "hysteresis: 4294967296 is out of range [-2147483648, 2147483647]");
  CHECK(rejection(json::parse(R"({"min_scale": 0, "overflow": []})")) ==
        "dynamic_scale_args.min_scale must be finite and > 0, got 0");
  CHECK(rejection(json::parse(R"({"consecutive_hysteresis": 1, "overflow": []})")) ==
        "consecutive_hysteresis: expected true or false, got 1");
  CHECK(rejection(json::parse(R"([1, 0])")) == "case: expected a JSON object, got [1,0]");
}

TEST_CASE("scaler case: hysteresis 0 is accepted, as in DeepSpeed (case I)") {
  const json out = run_scaler_case(json::parse(R"({"hysteresis": 0, "overflow": [1, 1, 1]})"));
  CHECK(out["scale_before"] == json::parse("[65536, 65536, 65536]"));
  CHECK(out["hysteresis_after"] == json::parse("[-1, -2, -3]"));
}
