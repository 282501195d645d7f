// Checkpoints on one rank: the safetensors bytes, bitwise resume for every ZeRO stage and several precision
// policies and rules (the uninterrupted run is the reference), bad input (each error names the key and both values,
// and the optimizer is left unchanged), and consolidation into full tensors. A Kahan master's compensation resumes
// bitwise too, crosses to and from other master roundings only when asked, and is summed into consolidated weights.
#include <doctest/doctest.h>

#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/mpopt.hpp>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "../checkpoint/harness.hpp"

namespace {

namespace ck = mpopt::checkpoint;
namespace fs = std::filesystem;
using ckpt_test::read_all;
using ckpt_test::write_all;

const ckpt_test::scratch_space scratch("mpopt_ckpt_host_");

constexpr int kSaveAfter = 3, kMore = 3, kOverflowStep = 1;

template <class Rule, class Prec, class Scaler>
struct config {
  typename Rule::args hp{};
  typename Scaler::args sargs{};
  double grad_magnitude = 1.0;
};

template <class Rule, class Prec, class Scaler>
using opt_t = mpopt::optimizer<Rule, Prec, Scaler>;

// N steps, save, load into a fresh optimizer (other initial params, other lr, possibly another stage), M more steps
// == N + M uninterrupted steps, bit for bit: masters, states, params (the caller's buffer too), step, scaler state.
template <class Rule, class Prec, class Scaler>
void check_resume(const config<Rule, Prec, Scaler>& c, int save_stage, int load_stage, const std::string& dir) {
  CAPTURE(save_stage);
  CAPTURE(load_stage);
  using O = opt_t<Rule, Prec, Scaler>;
  mpopt::comm::single_rank one;
  mpopt::step_options so;
  so.max_grad_norm = 0.5;
  mpopt::zero_options zs, zl;
  zs.stage = save_stage;
  zl.stage = load_stage;

  ckpt_test::model<Rule, Prec> ref_m(1), run_m(1), resumed_m(2);
  O ref(ref_m.specs(c.hp), one, zs, c.sargs, so);
  O run(run_m.specs(c.hp), one, zs, c.sargs, so);
  for (int k = 0; k < kSaveAfter + kMore; ++k) {
    ref_m.make_grads(k, kOverflowStep, c.grad_magnitude);
    ref.step();
  }
  for (int k = 0; k < kSaveAfter; ++k) {
    run_m.make_grads(k, kOverflowStep, c.grad_magnitude);
    run.step();
  }
  ck::save(run, dir);
  const auto at_save = ckpt_test::take(run);
  if constexpr (ckpt_test::is_kahan_v<O>) {  // the compensation carries state: most weights dropped a rounding
    std::size_t nonzero = 0, total = 0;
    for (const auto& comp : at_save.compensation)
      for (const auto& v : comp) nonzero += float(v) != 0.f, ++total;
    CHECK(nonzero > total / 2);
  }

  typename Rule::args other = c.hp;
  other.lr *= 3;  // restored from the checkpoint
  O resumed(resumed_m.specs(other), one, zl, c.sargs, so);
  ck::load(resumed, dir);
  const std::string loaded = ckpt_test::diff(at_save, ckpt_test::take(resumed));
  CHECK_MESSAGE(loaded.empty(), "right after load: " << loaded);
  CHECK(resumed.hparams(0).lr == c.hp.lr);
  CHECK(resumed.step_count() == run.step_count());
  CHECK(resumed.loss_scale() == run.loss_scale());
  for (int k = kSaveAfter; k < kSaveAfter + kMore; ++k) {
    resumed_m.make_grads(k, kOverflowStep, c.grad_magnitude);
    resumed.step();
  }
  const auto want = ckpt_test::take(ref);
  const std::string d = ckpt_test::diff(want, ckpt_test::take(resumed));
  CHECK_MESSAGE(d.empty(), d);
  if (load_stage < 3)  // the caller's own param buffer
    for (std::size_t g = 0; g < 2; ++g) CHECK(ckpt_test::same_bits(resumed_m.params[g], want.params[g]));
}

using adamw_fp32 = config<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler>;
using lamb_bf16 = config<mpopt::lamb, mpopt::bf16_mixed_policy, mpopt::no_scaler>;
using adamw_fp16 = config<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>;
using adamw_pure = config<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler>;
// All-bf16 with Kahan summation of the master, with bf16 and with fp32 optimizer states.
using kahan_fp32_states_policy =
    mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t, mpopt::kahan_summation>,
                     mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;
using adamw_kahan = config<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler>;
using adamw_kahan_fp32_states = config<mpopt::adamw, kahan_fp32_states_policy, mpopt::no_scaler>;

adamw_fp16 fp16_config() {
  adamw_fp16 c;
  c.sargs.init_scale = 1024.f;
  c.sargs.scale_window = 2;
  c.sargs.hysteresis = 1;
  c.grad_magnitude = 64.0;  // scaled grads
  return c;
}

// A small saved checkpoint for the bad-input cases: adamw, fp32, 3 steps.
std::string saved_adamw_fp32(const std::string& name) {
  const std::string dir = scratch(name);
  ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> m(1);
  opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> o(m.specs({}));
  for (int k = 0; k < 3; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  ck::save(o, dir);
  return dir;
}

// A saved checkpoint of `Prec` (adamw, 3 steps, one rank), and the optimizer that wrote it.
template <class Prec>
struct saved_run {
  ckpt_test::model<mpopt::adamw, Prec> m{1};
  opt_t<mpopt::adamw, Prec, mpopt::no_scaler> o{m.specs({})};
  std::string dir;
  explicit saved_run(const std::string& name) : dir(scratch(name)) {
    for (int k = 0; k < 3; ++k) {
      m.make_grads(k, -1, 1.0);
      o.step();
    }
    ck::save(o, dir);
  }
};

// load() must throw with every fragment in its message and leave `o` as it was.
template <class O>
void check_refused(O& o, const std::string& dir, const std::vector<std::string>& fragments,
                   const ck::load_options& lo = {}) {
  const auto before = ckpt_test::take(o);
  ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(o, dir, lo); }), fragments);
  const std::string d = ckpt_test::diff(before, ckpt_test::take(o));
  CHECK_MESSAGE(d.empty(), "changed by a refused load: " << d);
}

}  // namespace

TEST_CASE("safetensors: the bytes of a small file, written and read back") {
  const std::string dir = scratch("format");
  fs::create_directories(dir);
  const std::string path = dir + "/a.safetensors";
  const float a[2] = {1.0f, -2.0f};
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
  REQUIRE(ck::write_file(path, {{"a", "F32", {2}, a}}, {{"k", "v"}}, &bytes, &crc).ok());
  // 79 bytes of JSON padded with one space to 80 = 0x50, then 1.0f = 00 00 80 3f and -2.0f = 00 00 00 c0.
  const std::string header = R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )";
  const std::string want = std::string("\x50\0\0\0\0\0\0\0", 8) + header + std::string("\0\0\x80\x3f\0\0\0\xc0", 8);
  CHECK(read_all(path) == want);
  CHECK(bytes == want.size());
  ck::crc32 c;
  c.update(want.data(), want.size());
  CHECK(crc == c.value());
  CHECK(!fs::exists(path + ".tmp"));

  ck::input_file f;
  REQUIRE(f.open(path).ok());
  ck::safetensors_header h;
  REQUIRE(ck::read_header(f, h).ok());
  REQUIRE(h.tensors.size() == 1);
  CHECK(h.tensors[0].name == "a");
  CHECK(h.tensors[0].dtype == "F32");
  CHECK(h.tensors[0].shape == std::vector<std::uint64_t>{2});
  CHECK(h.metadata.at("k") == "v");
  CHECK(h.data_start == 88);

  // CRC-32 check value of "123456789" (zlib, IEEE).
  ck::crc32 check;
  check.update("123456789", 9);
  CHECK(check.value() == 0xCBF43926u);

  // Truncation and bad headers are reported with the file and the numbers.
  write_all(path, want.substr(0, want.size() - 3));
  ck::input_file t;
  REQUIRE(t.open(path).ok());
  mpopt::status st = ck::read_header(t, h);
  CHECK(st.message.find("truncated: the header describes 8 data bytes but the file holds 5") != std::string::npos);
  write_all(path, std::string("\x50\0\0\0\0\0\0\0", 8) + R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})");
  ck::input_file b;
  REQUIRE(b.open(path).ok());
  st = ck::read_header(b, h);
  CHECK(st.message.find("header length 80 but the file has") != std::string::npos);
}

TEST_CASE("json: parse, escapes, errors with the byte offset") {
  ck::json::value v;
  REQUIRE(ck::json::parse(R"( {"a": [1, -2.5e3, true, null], "b\n\u00e9": "x\"y"} )", v).ok());
  REQUIRE(v.is_object());
  CHECK(v.find("a")->items.size() == 4);
  CHECK(v.find("a")->items[1].text == "-2.5e3");
  CHECK(v.find("b\n\xc3\xa9")->text == "x\"y");
  CHECK(ck::json::quote("a\"b\\\n") == "\"a\\\"b\\\\\\n\"");
  CHECK(ck::json::parse(R"({"a": 1,})", v).message == "invalid JSON at byte 8: expected a string key");
  CHECK(ck::json::parse(R"({"a": 1} x)", v).message ==
        "invalid JSON at byte 9: trailing characters after the JSON value");
  CHECK(ck::json::parse(R"({"a": 1, "a": 2})", v).message.find("duplicate key \"a\"") != std::string::npos);
}

TEST_CASE("checkpoint: bitwise resume, every ZeRO stage, on one rank") {
  const std::string dir = scratch("resume");
  for (int stage = 0; stage < 4; ++stage) {
    SUBCASE("adamw fp32") {
      check_resume(adamw_fp32{}, stage, stage, dir);
    }
    SUBCASE("lamb bf16 params + fp32 master") {
      check_resume(lamb_bf16{}, stage, stage, dir);
    }
    SUBCASE("adamw fp16 + dynamic scaler") {
      check_resume(fp16_config(), stage, stage, dir);
    }
    SUBCASE("adamw all-bf16") {
      check_resume(adamw_pure{}, stage, stage, dir);
    }
  }
  SUBCASE("stage change 1 -> 3 and 3 -> 0") {
    check_resume(lamb_bf16{}, 1, 3, dir);
    check_resume(fp16_config(), 3, 0, dir);
  }
}

TEST_CASE("checkpoint: bitwise resume of a Kahan master, its compensation included") {
  const std::string dir = scratch("resume_kahan");
  for (int stage = 0; stage < 4; ++stage) {
    SUBCASE("adamw bf16 + Kahan, bf16 states") {
      check_resume(adamw_kahan{}, stage, stage, dir);
    }
    SUBCASE("adamw bf16 + Kahan, fp32 states") {
      check_resume(adamw_kahan_fp32_states{}, stage, stage, dir);
    }
  }
  SUBCASE("stage change 0 -> 3 and 2 -> 1") {
    check_resume(adamw_kahan{}, 0, 3, dir);
    check_resume(adamw_kahan_fp32_states{}, 2, 1, dir);
  }
  SUBCASE("the files and the index") {
    check_resume(adamw_kahan{}, 1, 1, dir);
    ck::index ix;
    REQUIRE(ck::read_index(dir, ix).ok());
    CHECK(ix.metadata.at("precision.master_rounding") == "kahan");
    CHECK(ix.kahan());
    ck::input_file f;
    REQUIRE(f.open(dir + "/rank-00000-of-00001.safetensors").ok());
    ck::safetensors_header h;
    REQUIRE(ck::read_header(f, h).ok());
    for (const char* name : {"group0.master_compensation", "group1.master_compensation"}) {
      const ck::tensor_info* t = h.find(name);
      REQUIRE_MESSAGE(t != nullptr, name);
      CHECK(t->dtype == "BF16");
      CHECK(t->shape == std::vector<std::uint64_t>{std::string(name) == "group0.master_compensation" ? 20001u : 9000u});
    }
    CHECK(h.metadata.at("precision.master_rounding") == "kahan");
  }
}

TEST_CASE("checkpoint: the scaler state round-trips exactly") {
  const std::string dir = scratch("scaler");
  const adamw_fp16 c = fp16_config();
  ckpt_test::model<mpopt::adamw, mpopt::fp16_mixed_policy> m(1), m2(1);
  opt_t<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> o(m.specs(c.hp), c.sargs);
  for (int k = 0; k < 5; ++k) {
    m.make_grads(k, 1, c.grad_magnitude);
    o.step();
  }
  const mpopt::scaler_state s = o.scaler_state();
  CHECK(s.iter == 5);  // not the initial state: an overflow at step 1
  CHECK(s.last_overflow_iter == 1);
  ck::save(o, dir);
  opt_t<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> fresh(m2.specs(c.hp), c.sargs);
  CHECK(fresh.loss_scale() == 1024.0);
  ck::load(fresh, dir);
  CHECK(std::memcmp(&fresh.scaler_state(), &s, sizeof s) == 0);
}

TEST_CASE("checkpoint: files, index and crash safety") {
  const std::string dir = saved_adamw_fp32("files");
  CHECK(fs::exists(dir + "/index.json"));
  CHECK(fs::exists(dir + "/rank-00000-of-00001.safetensors"));
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().extension() != ".tmp");
  ck::index ix;
  REQUIRE(ck::read_index(dir, ix).ok());
  CHECK(ix.metadata.at("rule") == "adamw");
  CHECK(ix.metadata.at("precision.master") == "fp32");
  CHECK(ix.metadata.at("step") == "3");
  CHECK(ix.metadata.at("group.0.tensor_sizes") == "3000,0,7000,11,9989,1");
  CHECK(ix.metadata.at("group.1.tensor_sizes") == "9000");
  CHECK(ix.metadata.at("group.0.states") == "exp_avg,exp_avg_sq");
  CHECK(ix.metadata.at("group.0.hparams.lr") == "0.001");
  CHECK(ix.metadata.at("group.0.hparams.adam_w_mode") == "true");
  REQUIRE(ix.files.size() == 1);
  CHECK(ix.files[0].ranges[0] == mpopt::zero::range{0, 20001});

  // A save that stopped before its index (as a crash would leave it) does not load.
  fs::remove(dir + "/index.json");
  ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> m(5);
  opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> o(m.specs({}));
  check_refused(o, dir, {"no readable index.json", "incomplete or interrupted save"});
}

TEST_CASE("checkpoint: bad input is refused, naming what differs, and nothing is loaded") {
  ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> m(5);
  opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> o(m.specs({}));

  SUBCASE("truncated rank file") {
    const std::string dir = saved_adamw_fp32("truncated");
    const std::string f = dir + "/rank-00000-of-00001.safetensors";
    fs::resize_file(f, fs::file_size(f) - 100);
    check_refused(o, dir, {"rank-00000-of-00001.safetensors", "the index says", "(truncated)"});
  }
  SUBCASE("a flipped data byte") {
    const std::string dir = saved_adamw_fp32("corrupt");
    const std::string f = dir + "/rank-00000-of-00001.safetensors";
    std::string bytes = read_all(f);
    bytes[bytes.size() - 10] ^= 0x40;
    write_all(f, bytes);
    check_refused(o, dir, {"crc32 is", "the index says"});
  }
  SUBCASE("a file from another save") {
    const std::string dir = saved_adamw_fp32("mixed");
    const std::string other = saved_adamw_fp32("mixed_other");
    fs::copy_file(other + "/rank-00000-of-00001.safetensors", dir + "/rank-00000-of-00001.safetensors",
                  fs::copy_options::overwrite_existing);
    ck::load_options lo;
    lo.verify_checksums = false;  // the save id still tells them apart
    check_refused(o, dir, {"metadata \"save_id\" is", "a file from another save"}, lo);
  }
  SUBCASE("a broken index") {
    const std::string dir = saved_adamw_fp32("broken_index");
    write_all(dir + "/index.json", "{\"metadata\": {\"format\": ");
    check_refused(o, dir, {"index.json", "invalid JSON at byte"});
  }
  SUBCASE("another rule") {
    const std::string dir = saved_adamw_fp32("rule");
    ckpt_test::model<mpopt::lamb, mpopt::bf16_mixed_policy> lm(5);
    opt_t<mpopt::lamb, mpopt::bf16_mixed_policy, mpopt::no_scaler> lo(lm.specs({}));
    check_refused(lo, dir, {"\"rule\": checkpoint has \"adamw\", this optimizer has \"lamb\""});
  }
  SUBCASE("another scaler") {
    const std::string dir = saved_adamw_fp32("scaler");
    ckpt_test::model<mpopt::adamw, mpopt::fp16_mixed_policy> hm(5);
    opt_t<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> ho(hm.specs({}));
    check_refused(ho, dir, {"\"scaler\": checkpoint has \"none\", this optimizer has \"dynamic\""});
  }
  SUBCASE("another master dtype") {
    const std::string dir = saved_adamw_fp32("dtype");
    ckpt_test::model<mpopt::adamw, mpopt::bf16_pure_policy> pm(5);
    opt_t<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler> po(pm.specs({}));
    check_refused(po, dir, {"\"precision.master\": checkpoint has \"fp32\", this optimizer has \"bf16\""});
  }
  SUBCASE("another state count") {
    const std::string dir = saved_adamw_fp32("states");
    mpopt::adamw::args a;
    a.amsgrad = true;
    ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> am(5);
    opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> ao(am.specs(a));
    check_refused(ao, dir, {"\"group.0.num_states\": checkpoint has \"2\", this optimizer has \"3\""});
  }
  SUBCASE("another model shape") {
    const std::string dir = saved_adamw_fp32("shape");
    auto specs = m.specs({});
    specs[0].tensor_sizes = {3000, 7000, 10001};
    opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> so(specs);
    check_refused(so, dir,
                  {"\"group.0.tensor_sizes\": checkpoint has \"3000,0,7000,11,9989,1\", this optimizer has "
                   "\"3000,7000,10001\""});
    auto one_group = m.specs({});
    one_group.pop_back();
    opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> go(one_group);
    check_refused(go, dir, {"\"groups\": checkpoint has \"2\", this optimizer has \"1\""});
  }
  SUBCASE("an invalid saved hyper-parameter") {
    const std::string dir = saved_adamw_fp32("hparam");
    std::string idx = read_all(dir + "/index.json");
    const std::string key = "\"group.1.hparams.beta1\": \"0.90000000000000002\"";
    REQUIRE(idx.find(key) != std::string::npos);
    idx.replace(idx.find(key), key.size(), "\"group.1.hparams.beta1\": \"1.5\"");
    write_all(dir + "/index.json", idx);
    check_refused(o, dir, {"group 1: ", "beta1 must be in [0, 1)", "1.5"});
  }
}

TEST_CASE("checkpoint: master rounding mismatches are refused unless asked for, naming both values") {
  using kahan_o = opt_t<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler>;
  using stochastic_o = opt_t<mpopt::adamw, mpopt::bf16_stochastic_policy, mpopt::no_scaler>;
  using nearest_o = opt_t<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler>;
  // A Kahan optimizer a few steps in, so that "unchanged" covers a compensation that is not zero.
  ckpt_test::model<mpopt::adamw, mpopt::bf16_kahan_policy> km(5);
  kahan_o ko(km.specs({}));
  for (int k = 0; k < 2; ++k) {
    km.make_grads(10 + k, -1, 1.0);
    ko.step();
  }
  const std::string hint = "set load_options::convert_master_rounding";

  SUBCASE("a Kahan checkpoint into nearest and stochastic rounding") {
    saved_run<mpopt::bf16_kahan_policy> saved("kahan_to_other");
    ckpt_test::model<mpopt::adamw, mpopt::bf16_pure_policy> nm(5);
    nearest_o no(nm.specs({}));
    check_refused(no, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"nearest\"", hint});
    ckpt_test::model<mpopt::adamw, mpopt::bf16_stochastic_policy> sm(5);
    stochastic_o so(sm.specs({}));
    check_refused(so, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"stochastic\""});
  }
  SUBCASE("a nearest checkpoint into Kahan") {
    saved_run<mpopt::bf16_pure_policy> saved("nearest_to_kahan");
    check_refused(ko, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"nearest\", this optimizer has \"kahan\"", hint});
  }
  SUBCASE("an index that says kahan over files without a compensation") {
    saved_run<mpopt::bf16_pure_policy> saved("kahan_without_compensation");
    std::string idx = read_all(saved.dir + "/index.json");
    const std::string key = "\"precision.master_rounding\": \"nearest\"";
    REQUIRE(idx.find(key) != std::string::npos);
    idx.replace(idx.find(key), key.size(), "\"precision.master_rounding\": \"kahan\"");
    write_all(saved.dir + "/index.json", idx);
    check_refused(ko, saved.dir,
                  {"rank-00000-of-00001.safetensors", "tensor \"group0.master_compensation\" is missing"});
    idx.replace(idx.find("\"kahan\""), 7, "\"fancy\"");
    write_all(saved.dir + "/index.json", idx);
    check_refused(ko, saved.dir,
                  {"metadata \"precision.master_rounding\" must be nearest, stochastic or kahan, got \"fancy\""});
  }
}

TEST_CASE("checkpoint: convert_master_rounding folds a Kahan compensation into the master, or starts one at zero") {
  ck::load_options lo;
  lo.convert_master_rounding = true;

  SUBCASE("Kahan -> an fp32 master keeps master + compensation") {
    saved_run<kahan_fp32_states_policy> saved("fold_fp32");
    ckpt_test::model<mpopt::adamw, mpopt::bf16_mixed_policy> wm(5);
    opt_t<mpopt::adamw, mpopt::bf16_mixed_policy, mpopt::no_scaler> wide(wm.specs({}));
    lo.convert_dtypes = true;  // bf16 master -> fp32
    ck::load(wide, saved.dir, lo);
    std::size_t moved = 0;
    for (std::size_t g = 0; g < 2; ++g) {
      const mpopt::bf16_t* m = saved.o.master(g);
      const mpopt::bf16_t* c = saved.o.compensation(g);
      for (std::size_t i = 0; i < ckpt_test::group_size(g); ++i) {
        const float want = ckpt_test::kahan_weight_ref(m[i], c[i]);
        REQUIRE(wide.master(g)[i] == want);
        moved += want != float(m[i]);
        for (int j = 0; j < 2; ++j) REQUIRE(wide.state(g, j)[i] == saved.o.state(g, j)[i]);  // fp32 both
      }
    }
    CHECK(moved > (ckpt_test::group_size(0) + ckpt_test::group_size(1)) / 2);  // the compensation was not lost
  }
  SUBCASE("Kahan -> a bf16 nearest master: master + compensation rounded once to bf16") {
    saved_run<kahan_fp32_states_policy> saved("fold_bf16");
    using prec = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t>, mpopt::grad<mpopt::bf16_t>,
                                  mpopt::state<float>>;
    ckpt_test::model<mpopt::adamw, prec> nm(5);
    opt_t<mpopt::adamw, prec, mpopt::no_scaler> no(nm.specs({}));
    ck::load(no, saved.dir, lo);
    for (std::size_t g = 0; g < 2; ++g) {
      const mpopt::bf16_t* m = saved.o.master(g);
      const mpopt::bf16_t* c = saved.o.compensation(g);
      for (std::size_t i = 0; i < ckpt_test::group_size(g); ++i) {
        const double sum = double(float(m[i])) + double(float(c[i]));
        REQUIRE(double(float(sum)) == sum);  // exact in fp32, so bf16_t(float) rounds the exact sum once
        REQUIRE(no.master(g)[i].bits == mpopt::bf16_t(float(sum)).bits);
        REQUIRE(nm.params[g][i].bits == no.master(g)[i].bits);  // the param buffer is the master
      }
    }
  }
  SUBCASE("nearest -> Kahan starts the compensation at zero") {
    saved_run<mpopt::bf16_pure_policy> saved("nearest_to_kahan_zero");
    ckpt_test::model<mpopt::adamw, mpopt::bf16_kahan_policy> km(5);
    opt_t<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler> ko(km.specs({}));
    km.make_grads(0, -1, 1.0);
    ko.step();
    std::size_t nonzero = 0;
    for (std::size_t i = 0; i < ckpt_test::group_size(0); ++i) nonzero += ko.compensation(0)[i].bits != 0;
    REQUIRE(nonzero > 0);  // so that zeroing it is seen
    ck::load(ko, saved.dir, lo);
    CHECK(ko.step_count() == 3);
    for (std::size_t g = 0; g < 2; ++g)
      for (std::size_t i = 0; i < ckpt_test::group_size(g); ++i) {
        REQUIRE(ko.compensation(g)[i].bits == 0);
        REQUIRE(ko.master(g)[i].bits == saved.o.master(g)[i].bits);
        for (int j = 0; j < 2; ++j) REQUIRE(ko.state(g, j)[i].bits == saved.o.state(g, j)[i].bits);
      }
  }
}

TEST_CASE("checkpoint: convert_dtypes rounds a wider master once") {
  const std::string dir = saved_adamw_fp32("convert");
  ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> m(1);
  opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> src(m.specs({}));
  ck::load(src, dir);
  ckpt_test::model<mpopt::adamw, mpopt::bf16_pure_policy> pm(5);
  opt_t<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler> po(pm.specs({}));
  ck::load_options lo;
  lo.convert_dtypes = true;
  ck::load(po, dir, lo);
  for (std::size_t g = 0; g < 2; ++g)
    for (std::size_t i = 0; i < ckpt_test::group_size(g); ++i) {
      REQUIRE(po.master(g)[i].bits == mpopt::convert<mpopt::bf16_t>(src.master(g)[i]).bits);
      REQUIRE(po.state(g, 1)[i].bits == mpopt::convert<mpopt::bf16_t>(src.state(g, 1)[i]).bits);
    }
}

TEST_CASE("checkpoint: consolidate into one tensor per model tensor") {
  const std::string dir = saved_adamw_fp32("consolidate");
  ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> m(1);
  opt_t<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> o(m.specs({}));
  ck::load(o, dir);
  const std::string out = dir + "/full.safetensors";
  ck::consolidate_options co;
  co.states = true;
  REQUIRE(ck::consolidate(dir, out, co).ok());
  ck::input_file f;
  REQUIRE(f.open(out).ok());
  ck::safetensors_header h;
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.metadata.at("rule") == "adamw");
  CHECK(h.tensors.size() == 3 * (6 + 1));  // master + 2 states per tensor
  const ck::tensor_info* t = h.find("group0.tensor4");
  REQUIRE(t != nullptr);
  CHECK(t->shape == std::vector<std::uint64_t>{9989});
  std::vector<float> got(9989);
  REQUIRE(f.read(h.data_start + t->begin, got.data(), got.size() * 4).ok());
  CHECK(ckpt_test::same_bits(got, std::vector<float>(o.master(0) + 10011, o.master(0) + 20000)));
  const ck::tensor_info* s = h.find("group1.tensor0.exp_avg_sq");
  REQUIRE(s != nullptr);
  std::vector<float> st(9000);
  REQUIRE(f.read(h.data_start + s->begin, st.data(), st.size() * 4).ok());
  CHECK(ckpt_test::same_bits(st, std::vector<float>(o.state(1, 1), o.state(1, 1) + 9000)));

  co.dtype = "bf16";
  co.states = false;
  REQUIRE(ck::consolidate(dir, out, co).ok());
  ck::input_file f16;
  REQUIRE(f16.open(out).ok());
  REQUIRE(ck::read_header(f16, h).ok());
  CHECK(h.tensors.size() == 7);
  t = h.find("group0.tensor0");
  REQUIRE(t != nullptr);
  CHECK(t->dtype == "BF16");
  std::vector<mpopt::bf16_t> b(3000);
  REQUIRE(f16.read(h.data_start + t->begin, b.data(), b.size() * 2).ok());
  for (std::size_t i = 0; i < 3000; ++i) REQUIRE(b[i].bits == mpopt::convert<mpopt::bf16_t>(o.master(0)[i]).bits);

  co.dtype = "int8";
  CHECK(ck::consolidate(dir, out, co).message == "consolidate: dtype must be fp32, bf16, fp16 or fp64, got \"int8\"");
}

TEST_CASE("checkpoint: consolidating a Kahan checkpoint writes master + compensation") {
  saved_run<mpopt::bf16_kahan_policy> saved("consolidate_kahan");
  const std::string out = saved.dir + "/full.safetensors";
  ck::consolidate_options co;
  co.states = true;
  REQUIRE(ck::consolidate(saved.dir, out, co).ok());  // default dtype: fp32
  ck::input_file f;
  REQUIRE(f.open(out).ok());
  ck::safetensors_header h;
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.metadata.at("consolidated_dtype") == "fp32");
  CHECK(h.tensors.size() == 3 * (6 + 1));               // weight + 2 states per tensor; no compensation of its own
  const ck::tensor_info* t = h.find("group0.tensor2");  // elements [3000, 10000)
  REQUIRE(t != nullptr);
  CHECK(t->dtype == "F32");
  std::vector<float> got(7000);
  REQUIRE(f.read(h.data_start + t->begin, got.data(), got.size() * 4).ok());
  const mpopt::bf16_t* m = saved.o.master(0);
  const mpopt::bf16_t* c = saved.o.compensation(0);
  std::size_t moved = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    REQUIRE(got[i] == ckpt_test::kahan_weight_ref(m[3000 + i], c[3000 + i]));
    moved += got[i] != float(m[3000 + i]);
  }
  CHECK(moved > got.size() / 2);
  const ck::tensor_info* s = h.find("group1.tensor0.exp_avg");  // bf16 state widened exactly
  REQUIRE(s != nullptr);
  std::vector<float> st(9000);
  REQUIRE(f.read(h.data_start + s->begin, st.data(), st.size() * 4).ok());
  for (std::size_t i = 0; i < st.size(); ++i) REQUIRE(st[i] == float(saved.o.state(1, 0)[i]));

  co.states = false;
  co.dtype = "fp64";
  REQUIRE(ck::consolidate(saved.dir, out, co).ok());
  ck::input_file f64;
  REQUIRE(f64.open(out).ok());
  REQUIRE(ck::read_header(f64, h).ok());
  t = h.find("group1.tensor0");
  REQUIRE(t != nullptr);
  std::vector<double> d(9000);
  REQUIRE(f64.read(h.data_start + t->begin, d.data(), d.size() * 8).ok());
  for (std::size_t i = 0; i < d.size(); ++i)
    REQUIRE(d[i] == double(float(saved.o.master(1)[i])) + double(float(saved.o.compensation(1)[i])));

  co.dtype = "bf16";
  REQUIRE(ck::consolidate(saved.dir, out, co).ok());
  ck::input_file f16;
  REQUIRE(f16.open(out).ok());
  REQUIRE(ck::read_header(f16, h).ok());
  t = h.find("group1.tensor0");
  REQUIRE(t != nullptr);
  std::vector<mpopt::bf16_t> b(9000);
  REQUIRE(f16.read(h.data_start + t->begin, b.data(), b.size() * 2).ok());
  for (std::size_t i = 0; i < b.size(); ++i) {
    const double sum = double(float(saved.o.master(1)[i])) + double(float(saved.o.compensation(1)[i]));
    REQUIRE(double(float(sum)) == sum);  // exact in fp32, so bf16_t(float) rounds the exact sum once
    REQUIRE(b[i].bits == mpopt::bf16_t(float(sum)).bits);
  }
}

// For the mpopt-consolidate ctest (tests/checkpoint/consolidate_test.cmake): one rank's checkpoints where told to.
TEST_CASE("checkpoint: fixture for the consolidation tool test") {
  mpopt::comm::single_rank one;
  ckpt_test::save_consolidation_fixtures(one);
}
