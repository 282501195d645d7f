// Checkpoints of the 1-bit optimizers on one rank (checkpoint/onebit.hpp): bitwise resume for 1-bit Adam, 0/1 Adam
// and 1-bit LAMB (fp32 and fp16 + dynamic scaling) saved in their compressed / local phase, the error buffers
// restored bit for bit, the files and index (readable by read_index and consolidate), and bad input: each error
// names what differs, and the optimizer is left unchanged. At world size 1 the 1-bit allreduce is the identity, so
// errors that matter for the continuation are tested under mpirun (tests/mpi/test_onebit_checkpoint.cpp).
#include <doctest/doctest.h>

#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/checkpoint/onebit.hpp>
#include <mpopt/mpopt.hpp>
#include <mpopt/onebit/optimizer.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "../checkpoint/onebit_harness.hpp"

namespace {

namespace ck = mpopt::checkpoint;
namespace fs = std::filesystem;
using ckpt_test::diff;
using ckpt_test::onebit_hparams;
using ckpt_test::options_for;
using ckpt_test::read_all;
using ckpt_test::save_after;
using ckpt_test::scaler_args;
using ckpt_test::take_onebit;
using ckpt_test::write_all;
using snapshot = ckpt_test::onebit_snapshot;

const ckpt_test::scratch_space scratch("mpopt_onebit_ckpt_host_");

template <class Rule, class Prec>
struct model : ckpt_test::onebit_model<Rule, Prec> {
  using param_t = typename Prec::param_t;
  using ckpt_test::onebit_model<Rule, Prec>::onebit_model;
  // The grads of step k; an inf at the overflow step.
  void make_grads(int k, int overflow_step, double magnitude) {
    for (std::size_t g = 0; g < 2; ++g)
      for (std::size_t i = 0; i < ckpt_test::onebit_sizes[g]; ++i)
        this->grads[g][i] =
            mpopt::convert<param_t>(magnitude * (0.3 + ckpt_test::noise(1000 + std::uint64_t(k), g, i)));
    if (k == overflow_step) this->grads[0][77] = mpopt::convert<param_t>(std::numeric_limits<double>::infinity());
  }
};

template <class Rule, class Prec, class Scaler>
using opt_t = mpopt::onebit::optimizer<Rule, Prec, Scaler>;

// A recognisable pattern in the error buffers (at world size 1 the optimizer leaves them at zero).
template <class Opt>
void poke_errors(Opt& o, float base) {
  for (std::size_t i = 0; i < o.num_error_buffers(); ++i) {
    mpopt::onebit::error_feedback& e = o.errors(i);
    for (std::size_t k = 0; k < e.worker.size(); ++k) e.worker[k] = base + float(k % 97) * 0.125f;
    for (std::size_t k = 0; k < e.server.size(); ++k) e.server[k] = -base - float(k % 89) * 0.25f;
  }
}

constexpr int kMore = 4;

// N steps, save, load into a fresh optimizer (other initial params, other lr), M more steps == N + M uninterrupted
// steps, bit for bit: masters, states, the caller's params, step, scaler state, schedule, sync points, LAMB state.
template <class Rule, class Prec, class Scaler>
void check_resume(const std::string& dir) {
  using O = opt_t<Rule, Prec, Scaler>;
  constexpr bool scaled = std::is_same_v<Scaler, mpopt::dynamic_scaler>;
  const double magnitude = scaled ? 64.0 : 1.0;
  const int overflow_step = scaled ? 1 : -1;  // a skipped step (scaler state and step count diverge)
  const int n = save_after<Rule>();
  CAPTURE(std::string(Rule::name));
  mpopt::step_options so;
  so.max_grad_norm = 2.0;
  const typename Rule::args hp = onebit_hparams<Rule>();
  model<Rule, Prec> ref_m(1), run_m(1), res_m(2);
  O ref(ref_m.specs(hp), scaler_args<Scaler>(), so, options_for<O>());
  O run(run_m.specs(hp), scaler_args<Scaler>(), so, options_for<O>());
  for (int k = 0; k < n + kMore; ++k) {
    ref_m.make_grads(k, overflow_step, magnitude);
    ref.step();
  }
  for (int k = 0; k < n; ++k) {
    run_m.make_grads(k, overflow_step, magnitude);
    run.step();
  }
  // The save point is where the 1-bit state matters.
  REQUIRE(run.next_phase() != mpopt::onebit::phase::warmup);
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
    REQUIRE(run.accumulated_lr(0) > 0);
    REQUIRE(run.current_schedule().local_step_interval > 1);
  }
  if constexpr (std::is_same_v<Rule, mpopt::onebit_lamb>) REQUIRE(run.lamb_state(0)[0].scaling_coeff != 0.0);
  ck::save(run, dir);

  typename Rule::args other = hp;
  other.lr *= 3;  // restored from the checkpoint
  O resumed(res_m.specs(other), scaler_args<Scaler>(), so, options_for<O>());
  const ck::onebit_load_result r = ck::load(resumed, dir);
  CHECK(r.errors_restored);
  CHECK(r.saved_world_size == 1);
  CHECK(r.step == run.step_count());
  CHECK(resumed.hparams(0).lr == hp.lr);
  const std::string at_load = diff(take_onebit(run), take_onebit(resumed));
  CHECK_MESSAGE(at_load.empty(), "differs right after the load: " << at_load);
  for (int k = n; k < n + kMore; ++k) {
    res_m.make_grads(k, overflow_step, magnitude);
    resumed.step();
  }
  const std::string d = diff(take_onebit(ref), take_onebit(resumed));
  CHECK_MESSAGE(d.empty(), "differs after the continuation: " << d);
  CHECK(ckpt_test::same_groups(res_m.params, ref_m.params));  // the caller's buffer
}

using adam_fp32 = opt_t<mpopt::onebit_adam, mpopt::fp32_policy, mpopt::no_scaler>;

// A checkpoint of 1-bit Adam (fp32) after 5 steps, with recognisable error buffers.
std::string saved_adam(const std::string& name) {
  const std::string dir = scratch(name);
  model<mpopt::onebit_adam, mpopt::fp32_policy> m(1);
  adam_fp32 o(m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  for (int k = 0; k < 5; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  poke_errors(o, 1.5f);
  ck::save(o, dir);
  return dir;
}

// load() must throw with every fragment in its message and leave `o` as it was.
template <class O>
void check_refused(O& o, const std::string& dir, const std::vector<std::string>& fragments,
                   const ck::load_options& lo = {}) {
  const snapshot before = take_onebit(o);
  ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(o, dir, lo); }), fragments);
  const std::string d = diff(before, take_onebit(o));
  CHECK_MESSAGE(d.empty(), "changed by a refused load: " << d);
}

// An optimizer with state of its own (steps taken, errors set), so a partial load would show.
template <class Rule, class Prec, class Scaler>
void give_state(opt_t<Rule, Prec, Scaler>& o, model<Rule, Prec>& m) {
  for (int k = 0; k < 4; ++k) {
    m.make_grads(100 + k, -1, 1.0);
    o.step();
  }
  poke_errors(o, -7.0f);
}

}  // namespace

TEST_CASE("onebit checkpoint: bitwise resume in the compressed phase, fp32") {
  const std::string dir = scratch("resume_fp32");
  SUBCASE("1-bit Adam") {
    check_resume<mpopt::onebit_adam, mpopt::fp32_policy, mpopt::no_scaler>(dir);
  }
  SUBCASE("0/1 Adam") {
    check_resume<mpopt::zero_one_adam, mpopt::fp32_policy, mpopt::no_scaler>(dir);
  }
  SUBCASE("1-bit LAMB") {
    check_resume<mpopt::onebit_lamb, mpopt::fp32_policy, mpopt::no_scaler>(dir);
  }
}

TEST_CASE("onebit checkpoint: bitwise resume with fp16 params and grads and dynamic loss scaling") {
  const std::string dir = scratch("resume_fp16");
  SUBCASE("1-bit Adam") {
    check_resume<mpopt::onebit_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(dir);
  }
  SUBCASE("0/1 Adam") {
    check_resume<mpopt::zero_one_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(dir);
  }
  SUBCASE("1-bit LAMB") {
    check_resume<mpopt::onebit_lamb, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(dir);
  }
}

TEST_CASE("onebit checkpoint: the error buffers are saved and restored bit for bit") {
  const std::string dir = saved_adam("errors");
  model<mpopt::onebit_adam, mpopt::fp32_policy> m(1), fresh_m(3);
  adam_fp32 o(m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  for (int k = 0; k < 5; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  poke_errors(o, 1.5f);  // as saved_adam() left them
  adam_fp32 fresh(fresh_m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  REQUIRE(fresh.errors(0).worker[1] == 0.0f);
  const ck::onebit_load_result r = ck::load(fresh, dir);
  CHECK(r.errors_restored);
  REQUIRE(fresh.num_error_buffers() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(fresh.errors(i).worker.size() == o.errors(i).worker.size());
    CHECK(std::memcmp(fresh.errors(i).worker.data(), o.errors(i).worker.data(), o.errors(i).worker.size() * 4) == 0);
    CHECK(std::memcmp(fresh.errors(i).server.data(), o.errors(i).server.data(), o.errors(i).server.size() * 4) == 0);
  }
  CHECK(diff(take_onebit(o), take_onebit(fresh)).empty());

  // 1-bit LAMB: one fused buffer for both groups.
  const std::string ldir = scratch("errors_lamb");
  using lamb_fp32 = opt_t<mpopt::onebit_lamb, mpopt::fp32_policy, mpopt::no_scaler>;
  model<mpopt::onebit_lamb, mpopt::fp32_policy> lm(1), lm2(2);
  lamb_fp32 l(lm.specs(onebit_hparams<mpopt::onebit_lamb>()), {}, {}, options_for<lamb_fp32>());
  poke_errors(l, 0.75f);
  ck::save(l, ldir);
  lamb_fp32 l2(lm2.specs(onebit_hparams<mpopt::onebit_lamb>()), {}, {}, options_for<lamb_fp32>());
  CHECK(ck::load(l2, ldir).errors_restored);
  REQUIRE(l2.num_error_buffers() == 1);
  CHECK(l2.errors(0).worker.size() == 2848);  // 2333 + 500 padded to a multiple of 32
  CHECK(diff(take_onebit(l), take_onebit(l2)).empty());
}

TEST_CASE("onebit checkpoint: files, index and crash safety") {
  const std::string dir = saved_adam("files");
  CHECK(fs::exists(dir + "/index.json"));
  CHECK(fs::exists(dir + "/state.safetensors"));
  CHECK(fs::exists(dir + "/local-rank-00000-of-00001.safetensors"));
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().extension() != ".tmp");

  // index.hpp's reader takes it: the state file is the one saving rank.
  ck::index ix;
  REQUIRE(ck::read_index(dir, ix).ok());
  CHECK(ix.metadata.at("rule") == "onebit_adam");
  CHECK(ix.metadata.at("step") == "5");
  CHECK(ix.metadata.at("onebit.world_size") == "1");
  CHECK(ix.metadata.at("onebit.error_buffers") == "2");
  CHECK(ix.metadata.at("onebit.errors.1.size") == "500");
  CHECK(ix.metadata.at("group.0.hparams.freeze_step") == "3");
  CHECK(ix.metadata.at("group.0.states") == "exp_avg,exp_avg_sq");
  REQUIRE(ix.files.size() == 1);
  CHECK(ix.files[0].file == "state.safetensors");
  CHECK(ix.files[0].ranges[1] == mpopt::zero::range{0, 500});
  CHECK(read_all(dir + "/index.json").find("\"local_files\": [") != std::string::npos);

  ck::input_file f;
  ck::safetensors_header h;
  REQUIRE(f.open(dir + "/state.safetensors").ok());
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.tensors.size() == 2 * 3);
  REQUIRE(h.find("group1.state.exp_avg_sq") != nullptr);
  CHECK(h.find("group1.state.exp_avg_sq")->shape == std::vector<std::uint64_t>{500});
  ck::input_file ef;
  REQUIRE(ef.open(dir + "/local-rank-00000-of-00001.safetensors").ok());
  REQUIRE(ck::read_header(ef, h).ok());
  CHECK(h.tensors.size() == 2 * 2);
  REQUIRE(h.find("errors0.worker") != nullptr);
  CHECK(h.find("errors0.worker")->shape == std::vector<std::uint64_t>{2336});  // 2333 padded to 32
  CHECK(h.find("errors0.worker")->dtype == "F32");
  CHECK(h.metadata.at("rank") == "0");
  CHECK(h.metadata.at("save_id") == ix.metadata.at("save_id"));

  // consolidate() reads it too: the master, one tensor per group.
  model<mpopt::onebit_adam, mpopt::fp32_policy> m(4);
  adam_fp32 o(m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  ck::load(o, dir);
  const std::string out = scratch("files_full.safetensors");
  REQUIRE(ck::consolidate(dir, out).ok());
  ck::input_file cf;
  REQUIRE(cf.open(out).ok());
  REQUIRE(ck::read_header(cf, h).ok());
  const ck::tensor_info* t = h.find("group0.tensor0");
  REQUIRE(t != nullptr);
  std::vector<float> got(2333);
  REQUIRE(cf.read(h.data_start + t->begin, got.data(), got.size() * 4).ok());
  CHECK(std::memcmp(got.data(), o.master(0), got.size() * 4) == 0);

  // A save that stopped before its index does not load.
  fs::remove(dir + "/index.json");
  model<mpopt::onebit_adam, mpopt::fp32_policy> m5(5);
  adam_fp32 o5(m5.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  give_state(o5, m5);
  check_refused(o5, dir, {"no readable index.json", "incomplete or interrupted save"});

  // Saving again over an old checkpoint replaces it.
  ck::save(o5, dir);
  adam_fp32 o6(m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  ck::load(o6, dir);
  CHECK(diff(take_onebit(o5), take_onebit(o6)).empty());
}

TEST_CASE("onebit checkpoint: bad input is refused, naming what differs, and nothing is loaded") {
  model<mpopt::onebit_adam, mpopt::fp32_policy> m(5);
  adam_fp32 o(m.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
  give_state(o, m);

  SUBCASE("another 1-bit rule") {
    const std::string dir = saved_adam("rule");
    using zo = opt_t<mpopt::zero_one_adam, mpopt::fp32_policy, mpopt::no_scaler>;
    model<mpopt::zero_one_adam, mpopt::fp32_policy> zm(5);
    zo z(zm.specs(onebit_hparams<mpopt::zero_one_adam>()), {}, {}, options_for<zo>());
    give_state(z, zm);
    check_refused(z, dir, {"\"rule\": checkpoint has \"onebit_adam\", this optimizer has \"zero_one_adam\""});
  }
  SUBCASE("a checkpoint of mpopt::optimizer, and the other way round") {
    const std::string dir = scratch("main_optimizer");
    model<mpopt::adamw, mpopt::fp32_policy> am(1);
    mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> a(am.specs({}));
    a.step();
    ck::save(a, dir);
    check_refused(o, dir, {"\"rule\": checkpoint has \"adamw\", this optimizer has \"onebit_adam\""});
    ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(a, saved_adam("to_main")); }),
                           {"\"rule\": checkpoint has \"onebit_adam\", this optimizer has \"adamw\""});
  }
  SUBCASE("another scaler") {
    const std::string dir = saved_adam("scaler");
    using h = opt_t<mpopt::onebit_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>;
    model<mpopt::onebit_adam, mpopt::fp16_mixed_policy> hm(5);
    h ho(hm.specs(onebit_hparams<mpopt::onebit_adam>()));
    give_state(ho, hm);
    check_refused(ho, dir, {"\"scaler\": checkpoint has \"none\", this optimizer has \"dynamic\""});
  }
  SUBCASE("another master dtype, and convert_dtypes") {
    const std::string dir = saved_adam("dtype");
    using p = opt_t<mpopt::onebit_adam, mpopt::bf16_pure_policy, mpopt::no_scaler>;
    model<mpopt::onebit_adam, mpopt::bf16_pure_policy> pm(5);
    p po(pm.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<p>());
    give_state(po, pm);
    check_refused(po, dir, {"\"precision.master\": checkpoint has \"fp32\", this optimizer has \"bf16\""});
    ck::load_options lo;
    lo.convert_dtypes = true;
    CHECK(ck::load(po, dir, lo).errors_restored);  // the error buffers are fp32 in every policy
    model<mpopt::onebit_adam, mpopt::fp32_policy> sm(1);
    adam_fp32 src(sm.specs(onebit_hparams<mpopt::onebit_adam>()), {}, {}, options_for<adam_fp32>());
    ck::load(src, dir);
    for (std::size_t i = 0; i < ckpt_test::onebit_sizes[0]; ++i) {
      REQUIRE(po.master(0)[i].bits == mpopt::convert<mpopt::bf16_t>(src.master(0)[i]).bits);
      REQUIRE(po.state(0, 1)[i].bits == mpopt::convert<mpopt::bf16_t>(src.state(0, 1)[i]).bits);
    }
  }
  SUBCASE("another model shape") {
    const std::string dir = saved_adam("shape");
    auto specs = m.specs(onebit_hparams<mpopt::onebit_adam>());
    specs[1].size = 499;
    adam_fp32 so(specs, {}, {}, options_for<adam_fp32>());
    check_refused(so, dir, {"\"group.1.size\": checkpoint has \"500\", this optimizer has \"499\""});
    adam_fp32 go(m.specs(onebit_hparams<mpopt::onebit_adam>(), 1), {}, {}, options_for<adam_fp32>());
    check_refused(go, dir, {"\"groups\": checkpoint has \"2\", this optimizer has \"1\""});
  }
  SUBCASE("1-bit LAMB with another tensor count") {
    const std::string dir = scratch("lamb_tensors");
    using lamb_fp32 = opt_t<mpopt::onebit_lamb, mpopt::fp32_policy, mpopt::no_scaler>;
    model<mpopt::onebit_lamb, mpopt::fp32_policy> lm(1);
    lamb_fp32 l(lm.specs(onebit_hparams<mpopt::onebit_lamb>()), {}, {}, options_for<lamb_fp32>());
    ck::save(l, dir);
    auto specs = lm.specs(onebit_hparams<mpopt::onebit_lamb>());
    specs[0].tensor_sizes = {700, 1633};
    lamb_fp32 l2(specs, {}, {}, options_for<lamb_fp32>());
    give_state(l2, lm);
    check_refused(l2, dir, {"\"group.0.tensors\": checkpoint has \"4\", this optimizer has \"2\""});
  }
  SUBCASE("truncated state file") {
    const std::string dir = saved_adam("truncated_state");
    const std::string f = dir + "/state.safetensors";
    fs::resize_file(f, fs::file_size(f) - 100);
    check_refused(o, dir, {"state.safetensors", "the index says", "(truncated)"});
  }
  SUBCASE("truncated error file, also without checksums") {
    const std::string dir = saved_adam("truncated_errors");
    const std::string f = dir + "/local-rank-00000-of-00001.safetensors";
    fs::resize_file(f, fs::file_size(f) - 4);
    check_refused(o, dir, {"local-rank-00000-of-00001.safetensors", "the index says", "(truncated)"});
    ck::load_options lo;
    lo.verify_checksums = false;
    check_refused(o, dir, {"local-rank-00000-of-00001.safetensors", "(truncated)"}, lo);
  }
  SUBCASE("missing error file") {
    const std::string dir = saved_adam("missing_errors");
    fs::remove(dir + "/local-rank-00000-of-00001.safetensors");
    check_refused(o, dir, {"cannot open", "local-rank-00000-of-00001.safetensors"});
  }
  SUBCASE("a flipped byte in the error file") {
    const std::string dir = saved_adam("corrupt_errors");
    const std::string f = dir + "/local-rank-00000-of-00001.safetensors";
    std::string bytes = read_all(f);
    bytes[bytes.size() - 10] ^= 0x40;
    write_all(f, bytes);
    check_refused(o, dir, {"local-rank-00000-of-00001.safetensors", "crc32 is", "the index says"});
  }
  SUBCASE("an error file from another save") {
    const std::string dir = saved_adam("mixed");
    const std::string other = saved_adam("mixed_other");
    const std::string f = "/local-rank-00000-of-00001.safetensors";
    fs::copy_file(other + f, dir + f, fs::copy_options::overwrite_existing);
    ck::load_options lo;
    lo.verify_checksums = false;  // the save id still tells them apart
    check_refused(o, dir, {"metadata \"save_id\" is", "a file from another save"}, lo);
  }
  SUBCASE("a bad saved schedule (0/1 Adam)") {
    const std::string dir = scratch("schedule");
    using zo = opt_t<mpopt::zero_one_adam, mpopt::fp32_policy, mpopt::no_scaler>;
    model<mpopt::zero_one_adam, mpopt::fp32_policy> zm(1);
    zo z(zm.specs(onebit_hparams<mpopt::zero_one_adam>()), {}, {}, options_for<zo>());
    give_state(z, zm);
    ck::save(z, dir);
    std::string idx = read_all(dir + "/index.json");
    const std::string key = "\"onebit.schedule.var_interval\": \"";
    REQUIRE(idx.find(key) != std::string::npos);
    idx.replace(idx.find(key) + key.size(), 1, "0");
    write_all(dir + "/index.json", idx);
    check_refused(z, dir, {"\"onebit.schedule.var_interval\": checkpoint has \"0\", an interval must be >= 1"});
  }
}
