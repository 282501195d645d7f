// Replays the torch.optim fixtures (tests/conformance/fixtures, made by make_torch_fixtures.py with torch 1.13)
// through the same function `mpopt-conformance optimizer` runs.
//
// Bounds, per element i with S_i = the largest magnitude that element reaches (w0 or any step): a plain
// elementwise relative bound is meaningless where a weight crosses zero, so "relative" is relative to S_i.
//   fp64: |ours - torch| <= 1e-14 * S_i      (the issue asks for 1e-12 relative)
//   fp32 (and fp32 masters): <= 5e-6 * S_i   (the issue asks for 1e-5 relative after 25 steps)
//   fp16/bf16 params and masters: within the fixture's ulp_tolerance representable values (1).
// torch's AVX2 kernels use fused multiply-adds where this build does not; those last-bit differences are what
// the fp32 bound absorbs (tests/conformance/README.md measures them).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "conformance.hpp"
#include "mpopt/numeric/convert.hpp"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::vector<fs::path> fixture_files() {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(MPOPT_FIXTURE_DIR))
    if (e.path().extension() == ".json") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

// Representable values of `dtype` between a and b (both exactly representable in it).
std::int64_t ulps_apart(double a, double b, const std::string& dtype) {
  auto ordered = [&](double x) -> std::int64_t {
    const std::uint16_t bits =
        dtype == "bf16" ? mpopt::convert<mpopt::bf16_t>(x).bits : mpopt::convert<mpopt::half_t>(x).bits;
    const std::int64_t mag = bits & 0x7fff;
    return (bits & 0x8000) ? -mag : mag;
  };
  return std::llabs(ordered(a) - ordered(b));
}

struct bound {
  std::string dtype;  // of the compared values
  double rel = 0;     // for fp32/fp64, times S_i
  std::int64_t ulps = 0;
};

bound bound_for(const std::string& dtype, const json& fixture) {
  if (dtype == "fp64") return {dtype, 1e-14, 0};
  if (dtype == "fp32") return {dtype, 5e-6, 0};
  return {dtype, 0, fixture.value("ulp_tolerance", std::int64_t(0))};
}

void compare(const json& got, const json& want, const json& w0, const bound& b, const std::string& what) {
  REQUIRE(got.size() == want.size());
  const std::size_t n = w0.size();
  std::vector<double> scale(n);
  for (std::size_t i = 0; i < n; ++i) {
    scale[i] = std::fabs(w0[i].get<double>());
    for (const auto& step : want) scale[i] = std::max(scale[i], std::fabs(step[i].get<double>()));
  }
  double worst = 0;
  std::int64_t worst_ulps = 0;
  for (std::size_t t = 0; t < want.size(); ++t) {
    for (std::size_t i = 0; i < n; ++i) {
      const double a = got[t][i].get<double>(), e = want[t][i].get<double>();
      if (b.rel > 0) {
        worst = std::max(worst, std::fabs(a - e) / std::max(scale[i], 1e-300));
      } else {
        worst_ulps = std::max(worst_ulps, ulps_apart(a, e, b.dtype));
      }
    }
  }
  INFO(what, " (", b.dtype, "): worst ", (b.rel > 0 ? worst : double(worst_ulps)));
  if (b.rel > 0) {
    CHECK(worst <= b.rel);
  } else {
    CHECK(worst_ulps <= b.ulps);
  }
}

}  // namespace

TEST_CASE("torch.optim fixtures replay within the stated bounds") {
  const auto files = fixture_files();
  REQUIRE(files.size() >= 34);
  for (const auto& path : files) {
    CAPTURE(path.filename().string());
    std::ifstream in(path);
    const json fixture = json::parse(in);
    const json& c = fixture.at("case");
    const json out = mpopt::conformance::run_optimizer_case(c);
    const std::string dtype = c.at("dtype").get<std::string>();
    std::string param = dtype, master = dtype;
    if (c.contains("precision")) {
      param = c["precision"].at("param").get<std::string>();
      master = c["precision"].at("master").get<std::string>();
    }
    compare(out.at("traj"), fixture.at("expected").at("traj"), c.at("w0"), bound_for(param, fixture), "params");
    compare(out.at("master"), fixture.at("expected").at("master"), c.at("w0"), bound_for(master, fixture), "master");
  }
}

TEST_CASE("a trajectory from mpopt-conformance differs from torch when the case differs") {
  // Guards the replay itself: a wrong learning rate must be caught by the same bounds.
  std::ifstream in(fs::path(MPOPT_FIXTURE_DIR) / "adamw_fp64.json");
  const json fixture = json::parse(in);
  json c = fixture.at("case");
  c["hparams"]["lr"] = c["hparams"]["lr"].get<double>() * (1 + 1e-9);
  const json out = mpopt::conformance::run_optimizer_case(c);
  double worst = 0;
  const auto& want = fixture["expected"]["traj"];
  for (std::size_t t = 0; t < want.size(); ++t)
    for (std::size_t i = 0; i < want[t].size(); ++i)
      worst = std::max(worst, std::fabs(out["traj"][t][i].get<double>() - want[t][i].get<double>()));
  CHECK(worst > 1e-14);
}

TEST_CASE("bad optimizer cases are rejected with a message naming the key") {
  using mpopt::conformance::bad_input;
  using mpopt::conformance::run_optimizer_case;
  const json ok = {
      {"optimizer", "sgd"}, {"dtype", "fp32"}, {"hparams", {{"lr", 0.1}}}, {"w0", {1.0, 2.0}}, {"grads", {{0.5, 0.5}}}};
  CHECK(run_optimizer_case(ok).at("traj").size() == 1);
  auto with = [&](const char* key, json v) {
    json c = ok;
    c[key] = std::move(v);
    return c;
  };
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("optimizer", "adamax")),
                       "optimizer: unknown \"adamax\" (adam, adamw, sgd, adagrad, lamb, lion)", bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("hparams", {{"momentun", 0.9}})),
                       "hparams.momentun: unknown key for optimizer \"sgd\"", bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("hparams", {{"lr", "fast"}})),
                       "hparams.lr: expected a number, got \"fast\"", bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("hparams", {{"lr", -1}})), "sgd.lr must be finite and >= 0, got -1",
                       bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("grads", {{0.5}})), "grads[0]: has 1 numbers, w0 has 2", bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("dtype", "fp8")), "dtype: expected \"fp32\" or \"fp64\", got \"fp8\"",
                       bad_input);
  CHECK_THROWS_WITH_AS(run_optimizer_case(with("steps", 3)), "steps: unknown key in the case", bad_input);
  CHECK_THROWS_WITH_AS(
      run_optimizer_case(
          with("precision", {{"param", "fp32"}, {"master", "fp32"}, {"grad", "fp32"}, {"state", "fp16"}})),
      "precision {param: fp32, master: fp32, grad: fp32, state: fp16}: fp16 optimizer states are not supported; use "
      "state fp32 (or bf16 with a bf16 master)",
      bad_input);
  json missing = ok;
  missing.erase("w0");
  CHECK_THROWS_WITH_AS(run_optimizer_case(missing), "w0: missing", bad_input);
}

TEST_CASE("every supported precision policy is reachable through the conformance case") {
  const char* names[] = {"fp32", "fp16", "bf16"};
  int reached = 0;
  for (const char* p : names)
    for (const char* m : names)
      for (const char* g : names)
        for (const char* s : names) {
          const json c = {{"optimizer", "adamw"},
                          {"dtype", "fp32"},
                          {"precision", {{"param", p}, {"master", m}, {"grad", g}, {"state", s}}},
                          {"w0", {0.5, -0.25}},
                          {"grads", {{0.1, 0.2}}}};
          try {
            const json out = mpopt::conformance::run_optimizer_case(c);
            CHECK(out.at("traj").size() == 1);
            ++reached;
          } catch (const mpopt::conformance::bad_input&) {
          }
        }
  CHECK(reached == 18);
}
