// Checkpoints of mpopt::muon_optimizer on one rank (checkpoint/muon.hpp): bitwise resume (N steps, save, load into a
// fresh optimizer, M steps == N + M uninterrupted steps) for fp32, bf16 params + fp32 master with dynamic loss
// scaling, all-bf16 with stochastic rounding and bf16 GEMMs, and a bf16 Kahan master (its compensation included),
// across ZeRO stages 0-2; the files and index (read by read_index and consolidate, which sums a Kahan master and its
// compensation); master rounding mismatches, refused unless load_options::convert_master_rounding; bad input, each
// error naming what differs, the optimizer left unchanged. Other world sizes: tests/mpi/test_muon_checkpoint.cpp.
#include <doctest/doctest.h>

#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/checkpoint/muon.hpp>
#include <mpopt/mpopt.hpp>
#include <mpopt/muon.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "../checkpoint/muon_harness.hpp"

namespace {

namespace ck = mpopt::checkpoint;
namespace fs = std::filesystem;
using ckpt_test::diff;
using ckpt_test::read_all;
using ckpt_test::scaler_args;
using ckpt_test::take_muon;
using ckpt_test::write_all;
using mpopt::matrix_shape;
using mpopt::muon_part;
template <class Opt>
using snapshot = ckpt_test::muon_snapshot<Opt>;

const ckpt_test::scratch_space scratch("mpopt_muon_ckpt_host_");

// Matrices tall, wide and square; aux tensors with a zero-sized one, and a group without tensor_sizes (amsgrad).
const std::vector<std::vector<matrix_shape>> kMatrices = {{{24, 40}, {40, 24}, {16, 16}, {8, 64}, {33, 7}}, {{20, 30}}};
const std::vector<std::vector<std::size_t>> kAux = {{7, 0, 500, 1}, {}};
const std::size_t kAuxSizes[2] = {508, 300};

mpopt::muon::args muon_hp(std::size_t g) {
  mpopt::muon::args a;
  a.lr = 0.02;
  a.nesterov = g == 0;
  a.adjust_lr = g == 0 ? mpopt::muon_adjust_lr::original : mpopt::muon_adjust_lr::match_rms_adamw;
  a.ns_coefficients = {3.0, -3.25, 1.25};
  a.ns_steps = 4;
  return a;
}
mpopt::adamw::args aux_hp(std::size_t g) {
  mpopt::adamw::args a;
  a.lr = 3e-3;
  a.amsgrad = g == 1;
  return a;
}

template <class Prec>
struct model {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<std::vector<param_t>> mp, ap;
  std::vector<std::vector<grad_t>> mg, ag;

  explicit model(std::uint64_t seed) {
    for (std::size_t g = 0; g < kMatrices.size(); ++g) {
      std::size_t n = 0;
      for (const matrix_shape& s : kMatrices[g]) n += s.rows * s.cols;
      mp.emplace_back(n);
      mg.emplace_back(n);
      for (std::size_t i = 0; i < n; ++i) mp[g][i] = mpopt::convert<param_t>(0.1 * ckpt_test::noise(seed, g, i));
    }
    for (std::size_t g = 0; g < kAux.size(); ++g) {
      ap.emplace_back(kAuxSizes[g]);
      ag.emplace_back(kAuxSizes[g]);
      for (std::size_t i = 0; i < kAuxSizes[g]; ++i)
        ap[g][i] = mpopt::convert<param_t>(ckpt_test::noise(seed, 10 + g, i));
    }
  }
  // `lr_factor` != 1: hyper-parameters that differ from the saved ones (load must restore them).
  std::vector<mpopt::muon_group<Prec>> matrices(double lr_factor = 1) {
    std::vector<mpopt::muon_group<Prec>> out;
    for (std::size_t g = 0; g < kMatrices.size(); ++g) {
      mpopt::muon_group<Prec> s;
      s.params = mp[g].data();
      s.grads = mg[g].data();
      s.shapes = std::vector<matrix_shape>(kMatrices[g]);  // not operator=: GCC 12 -O3 warns falsely (-Wnonnull)
      s.hparams = muon_hp(g);
      s.hparams.lr *= lr_factor;
      out.push_back(s);
    }
    return out;
  }
  std::vector<mpopt::param_group<mpopt::adamw, Prec>> aux(double lr_factor = 1) {
    std::vector<mpopt::param_group<mpopt::adamw, Prec>> out;
    for (std::size_t g = 0; g < kAux.size(); ++g) {
      mpopt::param_group<mpopt::adamw, Prec> s;
      s.params = ap[g].data();
      s.grads = ag[g].data();
      s.size = kAuxSizes[g];
      s.tensor_sizes = kAux[g];
      s.hparams = aux_hp(g);
      s.hparams.lr *= lr_factor;
      out.push_back(s);
    }
    return out;
  }
  // The grads of step k (a column drift keeps the matrices far from orthogonal); an inf at the overflow step.
  void make_grads(int k, int overflow_step, double magnitude) {
    for (std::size_t g = 0; g < mg.size(); ++g)
      for (std::size_t i = 0; i < mg[g].size(); ++i)
        mg[g][i] = mpopt::convert<grad_t>(
            magnitude * (ckpt_test::noise(100 + std::uint64_t(k), g, i) + 0.2 * double(i % 13) / 13.0));
    for (std::size_t g = 0; g < ag.size(); ++g)
      for (std::size_t i = 0; i < ag[g].size(); ++i)
        ag[g][i] = mpopt::convert<grad_t>(magnitude * 0.1 * ckpt_test::noise(200 + std::uint64_t(k), g, i));
    if (k == overflow_step) mg[0][77] = mpopt::convert<grad_t>(std::numeric_limits<double>::infinity());
  }
  bool same_params(const model& o) const {
    return ckpt_test::same_groups(mp, o.mp) && ckpt_test::same_groups(ap, o.ap);
  }
};

constexpr int kSaveAfter = 3, kMore = 3;

template <class Prec, class Scaler = mpopt::no_scaler, class Gemm = mpopt::muon_gemm<float>>
using opt_t = mpopt::muon_optimizer<Prec, Scaler, Gemm>;

template <class Prec, class Scaler, class Gemm>
void check_resume(int save_stage, int load_stage, const std::string& dir) {
  using O = opt_t<Prec, Scaler, Gemm>;
  CAPTURE(save_stage);
  CAPTURE(load_stage);
  constexpr bool scaled = std::is_same_v<Scaler, mpopt::dynamic_scaler>;
  const double magnitude = scaled ? 64.0 : 1.0;
  const int overflow_step = scaled ? 1 : -1;  // a skipped step: the step count and the scaler state diverge
  mpopt::comm::single_rank one;
  mpopt::step_options so;
  so.max_grad_norm = 20.0;  // clips some steps, not all
  so.rounding_seed = 1234;
  mpopt::zero_options zs, zl;
  zs.stage = save_stage;
  zl.stage = load_stage;
  model<Prec> ref_m(1), run_m(1), res_m(2);
  O ref(ref_m.matrices(), ref_m.aux(), one, zs, scaler_args<Scaler>(), so);
  O run(run_m.matrices(), run_m.aux(), one, zs, scaler_args<Scaler>(), so);
  for (int k = 0; k < kSaveAfter + kMore; ++k) {
    ref_m.make_grads(k, overflow_step, magnitude);
    ref.step();
  }
  for (int k = 0; k < kSaveAfter; ++k) {
    run_m.make_grads(k, overflow_step, magnitude);
    run.step();
  }
  CHECK(run.step_count() == (scaled ? kSaveAfter - 1 : kSaveAfter));
  ck::save(run, dir);
  if constexpr (ckpt_test::is_kahan_v<O>) {  // the compensation carries state: most weights dropped a rounding
    std::size_t nonzero = 0, total = 0;
    for (const auto& comp : take_muon(run).compensation)
      for (const auto& v : comp) nonzero += float(v) != 0.f, ++total;
    CHECK(nonzero > total / 2);
  }

  O resumed(res_m.matrices(3.0), res_m.aux(3.0), one, zl, scaler_args<Scaler>(), so);
  ck::load(resumed, dir);
  CHECK(resumed.matrix_hparams(0).lr == 0.02);
  CHECK(resumed.aux_hparams(1).lr == 3e-3);
  CHECK(resumed.loss_scale() == run.loss_scale());
  const std::string at_load = diff(take_muon(run), take_muon(resumed));
  CHECK_MESSAGE(at_load.empty(), "differs right after the load: " << at_load);
  CHECK(res_m.same_params(run_m));  // the caller's param copy, rewritten from the master
  for (int k = kSaveAfter; k < kSaveAfter + kMore; ++k) {
    res_m.make_grads(k, overflow_step, magnitude);
    resumed.step();
  }
  const std::string d = diff(take_muon(ref), take_muon(resumed));
  CHECK_MESSAGE(d.empty(), "differs after the continuation: " << d);
  CHECK(res_m.same_params(ref_m));
}

using fp32_opt = opt_t<mpopt::fp32_policy>;

// A small saved checkpoint for the bad-input cases: fp32, 3 steps.
std::string saved_fp32(const std::string& name) {
  const std::string dir = scratch(name);
  model<mpopt::fp32_policy> m(1);
  fp32_opt o(m.matrices(), m.aux());
  for (int k = 0; k < 3; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  ck::save(o, dir);
  return dir;
}

// An optimizer with state of its own (steps taken), so a partial load would show.
template <class O, class M>
void give_state(O& o, M& m) {
  for (int k = 0; k < 2; ++k) {
    m.make_grads(50 + k, -1, 1.0);
    o.step();
  }
}

// load() must throw with every fragment in its message and leave `o` (and its caller's params) as they were.
template <class O, class M>
void check_refused(O& o, const M& m, const std::string& dir, const std::vector<std::string>& fragments,
                   const ck::load_options& lo = {}) {
  const snapshot<O> before = take_muon(o);
  const M params_before = m;
  ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(o, dir, lo); }), fragments);
  const std::string d = diff(before, take_muon(o));
  CHECK_MESSAGE(d.empty(), "changed by a refused load: " << d);
  CHECK(m.same_params(params_before));
}

// The index's and the files' metadata value of `key` replaced (the index's CRCs cover only the rank files).
void edit_index(const std::string& dir, const std::string& key, const std::string& value) {
  std::string idx = read_all(dir + "/index.json");
  const std::string k = "\"" + key + "\": \"";
  const std::size_t at = idx.find(k);
  REQUIRE(at != std::string::npos);
  const std::size_t end = idx.find('"', at + k.size());
  idx.replace(at + k.size(), end - at - k.size(), value);
  write_all(dir + "/index.json", idx);
}

// All-bf16 with fp32 states, the master rounded three ways: Kahan, nearest and stochastic.
template <class Rounding>
using bf16_master_policy = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t, Rounding>,
                                            mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;
using kahan_policy = bf16_master_policy<mpopt::kahan_summation>;
using nearest_policy = bf16_master_policy<mpopt::nearest_rounding>;
using stochastic_policy = bf16_master_policy<mpopt::stochastic_rounding>;
using kahan_opt = opt_t<kahan_policy>;

// An optimizer 3 steps in, saved to scratch(name); `o` keeps the values it saved.
template <class Prec>
struct saved_run {
  std::string dir;
  model<Prec> m{1};
  opt_t<Prec> o{m.matrices(), m.aux()};
  explicit saved_run(const std::string& name) : dir(scratch(name)) {
    for (int k = 0; k < 3; ++k) {
      m.make_grads(k, -1, 1.0);
      o.step();
    }
    ck::save(o, dir);
  }
};

// float -> bf16 bits, round to nearest even, written here apart from the library's conversion (finite inputs).
std::uint16_t bf16_rne_bits(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

TEST_CASE("muon checkpoint: bitwise resume, fp32, ZeRO stages 0-2 on one rank") {
  const std::string dir = scratch("resume_fp32");
  for (int stage = 0; stage <= 2; ++stage)
    check_resume<mpopt::fp32_policy, mpopt::no_scaler, mpopt::muon_gemm<float>>(stage, stage, dir);
  check_resume<mpopt::fp32_policy, mpopt::no_scaler, mpopt::muon_gemm<float>>(0, 2, dir);
}

TEST_CASE("muon checkpoint: bitwise resume, bf16 params + fp32 master with dynamic loss scaling") {
  const std::string dir = scratch("resume_bf16");
  check_resume<mpopt::bf16_mixed_policy, mpopt::dynamic_scaler, mpopt::muon_gemm<float>>(1, 1, dir);
  check_resume<mpopt::bf16_mixed_policy, mpopt::dynamic_scaler, mpopt::muon_gemm<float>>(2, 0, dir);
}

TEST_CASE("muon checkpoint: bitwise resume, all-bf16 with stochastic rounding and bf16 GEMMs") {
  const std::string dir = scratch("resume_bf16_sr");
  check_resume<mpopt::bf16_stochastic_policy, mpopt::dynamic_scaler, mpopt::muon_gemm<mpopt::bf16_t>>(0, 1, dir);
}

TEST_CASE("muon checkpoint: files, index and consolidation") {
  const std::string dir = saved_fp32("files");
  CHECK(fs::exists(dir + "/index.json"));
  CHECK(fs::exists(dir + "/rank-00000-of-00001.safetensors"));
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().extension() != ".tmp");
  model<mpopt::fp32_policy> m(3);
  fp32_opt o(m.matrices(), m.aux());
  ck::load(o, dir);

  // index.hpp's reader takes it: one checkpoint group per tensor, 6 matrices then 5 aux tensors.
  ck::index ix;
  REQUIRE(ck::read_index(dir, ix).ok());
  const auto& md = ix.metadata;
  CHECK(md.at("rule") == "muon");
  CHECK(md.at("step") == "3");
  CHECK(md.at("muon.gemm") == "fp32");
  CHECK(md.at("muon.matrix_groups") == "2");
  CHECK(md.at("muon.aux_groups") == "2");
  CHECK(md.at("muon.matrix_group.0.shapes") == "24x40,40x24,16x16,8x64,33x7");
  CHECK(md.at("muon.matrix_group.1.hparams.nesterov") == "false");
  CHECK(md.at("muon.matrix_group.1.hparams.adjust_lr") == "match_rms_adamw");
  CHECK(md.at("muon.matrix_group.0.hparams.ns_steps") == "4");
  CHECK(std::strtod(md.at("muon.matrix_group.0.hparams.ns_coefficients.b").c_str(), nullptr) == -3.25);
  CHECK(std::strtod(md.at("muon.matrix_group.0.hparams.eps").c_str(), nullptr) == 1e-7);
  CHECK(std::strtod(md.at("muon.matrix_group.0.hparams.momentum").c_str(), nullptr) == 0.95);
  CHECK(md.at("muon.aux_group.0.tensor_sizes") == "7,0,500,1");
  CHECK(md.at("muon.aux_group.1.tensor_sizes") == "300");
  CHECK(md.at("muon.aux_group.1.states") == "exp_avg,exp_avg_sq,max_exp_avg_sq");
  CHECK(md.at("muon.aux_group.1.hparams.amsgrad") == "true");
  CHECK(md.at("groups") == "11");
  CHECK(md.at("group.4.tensor") == "matrix.0.4");
  CHECK(md.at("group.4.shape") == "33,7");
  CHECK(md.at("group.4.states") == "momentum_buffer");
  CHECK(md.at("group.8.tensor") == "aux.0.2");
  CHECK(md.at("group.8.shape") == "500");
  CHECK(md.at("group.10.states") == "exp_avg,exp_avg_sq,max_exp_avg_sq");
  REQUIRE(ix.groups.size() == 11);
  CHECK(ix.groups[4].size == 231);
  REQUIRE(ix.files.size() == 1);
  CHECK(ix.files[0].ranges[0] == mpopt::zero::range{0, 960});
  CHECK(ix.files[0].ranges[7] == mpopt::zero::range{0, 0});  // the empty aux tensor

  // Each tensor whole in its owner's file, 1-D.
  ck::input_file f;
  ck::safetensors_header h;
  REQUIRE(f.open(dir + "/rank-00000-of-00001.safetensors").ok());
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.tensors.size() == 6 * 2 + 4 * 3 + 4);
  const ck::tensor_info* t = h.find("group1.master");
  REQUIRE(t != nullptr);
  CHECK(t->shape == std::vector<std::uint64_t>{960});
  CHECK(t->dtype == "F32");
  CHECK(h.find("group10.state.max_exp_avg_sq") != nullptr);

  // consolidate(): one tensor per checkpoint group, "group<k>.tensor0", its master; states on request.
  const std::string out = scratch("files_full.safetensors");
  ck::consolidate_options co;
  co.states = true;
  REQUIRE(ck::consolidate(dir, out, co).ok());
  ck::input_file cf;
  REQUIRE(cf.open(out).ok());
  REQUIRE(ck::read_header(cf, h).ok());
  CHECK(h.metadata.at("group.1.tensor") == "matrix.0.1");
  const snapshot<fp32_opt> s = take_muon(o);
  auto read = [&](const std::string& name, std::size_t n) {
    const ck::tensor_info* ti = h.find(name);
    REQUIRE(ti != nullptr);
    REQUIRE(ti->elements() == n);
    std::vector<float> v(n);
    REQUIRE(cf.read(h.data_start + ti->begin, v.data(), n * 4).ok());
    return v;
  };
  // Matrix 0.1 (40x24) follows matrix 0.0 (960 elements) in group 0; aux tensor 0.2 is elements [7, 507).
  CHECK(ckpt_test::same_bits(read("group1.tensor0", 960),
                             std::vector<float>(s.master[0].begin() + 960, s.master[0].begin() + 1920)));
  CHECK(ckpt_test::same_bits(read("group1.tensor0.momentum_buffer", 960),
                             std::vector<float>(s.states[0][0].begin() + 960, s.states[0][0].begin() + 1920)));
  CHECK(ckpt_test::same_bits(read("group8.tensor0.exp_avg_sq", 500),
                             std::vector<float>(s.states[2][1].begin() + 7, s.states[2][1].begin() + 507)));
  CHECK(ckpt_test::same_bits(read("group10.tensor0", 300), s.master[3]));

  // Saving again over an old checkpoint replaces it.
  model<mpopt::fp32_policy> m2(4);
  fp32_opt o2(m2.matrices(), m2.aux());
  give_state(o2, m2);
  ck::save(o2, dir);
  fp32_opt o3(m.matrices(), m.aux());
  ck::load(o3, dir);
  CHECK(diff(take_muon(o2), take_muon(o3)).empty());
}

TEST_CASE("muon checkpoint: another Gemm type loads (compute policy, not state); convert_dtypes rounds once") {
  const std::string dir = saved_fp32("gemm");
  model<mpopt::fp32_policy> m(1), mb(5);
  fp32_opt src(m.matrices(), m.aux());
  ck::load(src, dir);
  opt_t<mpopt::fp32_policy, mpopt::no_scaler, mpopt::muon_gemm<mpopt::bf16_t>> b(mb.matrices(), mb.aux());
  ck::load(b, dir);
  const snapshot<fp32_opt> want = take_muon(src);
  const auto got = take_muon(b);
  for (std::size_t g = 0; g < 4; ++g) {
    CHECK(ckpt_test::same_bits(got.master[g], want.master[g]));
    for (std::size_t j = 0; j < want.states[g].size(); ++j)
      CHECK(ckpt_test::same_bits(got.states[g][j], want.states[g][j]));
  }
  CHECK(mb.same_params(m));

  // All-bf16 from the fp32 checkpoint: refused unless asked, then each value rounded to nearest even.
  model<mpopt::bf16_pure_policy> pm(5);
  opt_t<mpopt::bf16_pure_policy> p(pm.matrices(), pm.aux());
  give_state(p, pm);
  check_refused(p, pm, dir, {"\"precision.master\": checkpoint has \"fp32\", this optimizer has \"bf16\""});
  ck::load_options lo;
  lo.convert_dtypes = true;
  ck::load(p, dir, lo);
  const auto pb = take_muon(p);
  for (std::size_t g = 0; g < 4; ++g)
    for (std::size_t i = 0; i < want.master[g].size(); ++i) {
      REQUIRE(pb.master[g][i].bits == mpopt::convert<mpopt::bf16_t>(want.master[g][i]).bits);
      REQUIRE(pb.states[g][0][i].bits == mpopt::convert<mpopt::bf16_t>(want.states[g][0][i]).bits);
    }
}

TEST_CASE("muon checkpoint: bad input is refused, naming what differs, and nothing is loaded") {
  model<mpopt::fp32_policy> m(5);
  fp32_opt o(m.matrices(), m.aux());
  give_state(o, m);

  SUBCASE("missing index (an interrupted save)") {
    const std::string dir = saved_fp32("no_index");
    fs::remove(dir + "/index.json");
    check_refused(o, m, dir, {"no readable index.json", "incomplete or interrupted save"});
  }
  SUBCASE("truncated rank file, with and without checksums") {
    const std::string dir = saved_fp32("truncated");
    const std::string f = dir + "/rank-00000-of-00001.safetensors";
    fs::resize_file(f, fs::file_size(f) - 100);
    check_refused(o, m, dir, {"rank-00000-of-00001.safetensors", "the index says", "(truncated)"});
    ck::load_options lo;
    lo.verify_checksums = false;
    check_refused(o, m, dir, {"rank-00000-of-00001.safetensors", "(truncated)"}, lo);
  }
  SUBCASE("a flipped data byte") {
    const std::string dir = saved_fp32("corrupt");
    const std::string f = dir + "/rank-00000-of-00001.safetensors";
    std::string bytes = read_all(f);
    bytes[bytes.size() - 10] ^= 0x40;
    write_all(f, bytes);
    check_refused(o, m, dir, {"crc32 is", "the index says"});
  }
  SUBCASE("other matrix shapes, another aux layout, another group count") {
    const std::string dir = saved_fp32("shapes");
    auto mats = m.matrices();
    mats[0].shapes[1] = {24, 40};  // same size, other shape
    fp32_opt so(mats, m.aux());
    check_refused(so, m, dir,
                  {"\"muon.matrix_group.0.shapes\": checkpoint has \"24x40,40x24,16x16,8x64,33x7\", this optimizer "
                   "has \"24x40,24x40,16x16,8x64,33x7\""});
    auto aux = m.aux();
    aux[0].tensor_sizes = {7, 500, 1};
    fp32_opt ao(m.matrices(), aux);
    check_refused(ao, m, dir,
                  {"\"muon.aux_group.0.tensor_sizes\": checkpoint has \"7,0,500,1\", this optimizer has \"7,500,1\""});
    auto one = m.matrices();
    one.pop_back();
    fp32_opt go(one, m.aux());
    check_refused(go, m, dir, {"\"muon.matrix_groups\": checkpoint has \"2\", this optimizer has \"1\""});
  }
  SUBCASE("amsgrad on the other aux group (another state count)") {
    const std::string dir = saved_fp32("amsgrad");
    auto aux = m.aux();
    aux[0].hparams.amsgrad = true;
    fp32_opt ao(m.matrices(), aux);
    check_refused(ao, m, dir,
                  {"\"muon.aux_group.0.states\": checkpoint has \"exp_avg,exp_avg_sq\", this optimizer has "
                   "\"exp_avg,exp_avg_sq,max_exp_avg_sq\""});
  }
  SUBCASE("another precision policy or scaler") {
    const std::string dir = saved_fp32("policy");
    model<mpopt::bf16_mixed_policy> bm(5);
    opt_t<mpopt::bf16_mixed_policy, mpopt::dynamic_scaler> b(bm.matrices(), bm.aux());
    check_refused(b, bm, dir, {"\"scaler\": checkpoint has \"none\", this optimizer has \"dynamic\""});
    model<mpopt::bf16_stochastic_policy> sm(5);
    opt_t<mpopt::bf16_stochastic_policy> so(sm.matrices(), sm.aux());
    check_refused(so, sm, dir,
                  {"\"precision.master_rounding\": checkpoint has \"nearest\", this optimizer has \"stochastic\""});
  }
  SUBCASE("a checkpoint of mpopt::optimizer, and the other way round") {
    const std::string dir = scratch("main_optimizer");
    ckpt_test::model<mpopt::adamw, mpopt::fp32_policy> am(1);
    mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> a(am.specs({}));
    ck::save(a, dir);
    check_refused(o, m, dir, {"\"rule\": checkpoint has \"adamw\", this optimizer has \"muon\""});
    ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(a, saved_fp32("to_main")); }),
                           {"\"rule\": checkpoint has \"muon\", this optimizer has \"adamw\""});
  }
  SUBCASE("invalid saved hyper-parameters") {
    const std::string dir = saved_fp32("hparams");
    edit_index(dir, "muon.matrix_group.1.hparams.ns_steps", "100");
    check_refused(o, m, dir, {"matrix group 1: ", "muon.ns_steps must be in [0, 100), got 100"});
    edit_index(dir, "muon.matrix_group.1.hparams.ns_steps", "5");
    edit_index(dir, "muon.matrix_group.0.hparams.adjust_lr", "spectral");
    check_refused(o, m, dir,
                  {"\"muon.matrix_group.0.hparams.adjust_lr\": checkpoint has \"spectral\", it must be "
                   "\"original\" or \"match_rms_adamw\""});
    edit_index(dir, "muon.matrix_group.0.hparams.adjust_lr", "original");
    edit_index(dir, "muon.aux_group.0.hparams.beta2", "1.5");
    check_refused(o, m, dir, {"aux group 0: ", "beta2 must be in [0, 1)", "1.5"});
  }
  SUBCASE("a file from another save") {
    const std::string dir = saved_fp32("mixed");
    const std::string other = saved_fp32("mixed_other");
    fs::copy_file(other + "/rank-00000-of-00001.safetensors", dir + "/rank-00000-of-00001.safetensors",
                  fs::copy_options::overwrite_existing);
    ck::load_options lo;
    lo.verify_checksums = false;  // the save id still tells them apart
    check_refused(o, m, dir, {"metadata \"save_id\" is", "a file from another save"}, lo);
  }
}

TEST_CASE("muon checkpoint: bitwise resume of a Kahan master, its compensation included") {
  const std::string dir = scratch("resume_kahan");
  for (int stage = 0; stage <= 2; ++stage)
    check_resume<kahan_policy, mpopt::no_scaler, mpopt::muon_gemm<float>>(stage, stage, dir);
  check_resume<kahan_policy, mpopt::no_scaler, mpopt::muon_gemm<float>>(2, 0, dir);
  // bf16 states, dynamic loss scaling with a skipped step, bf16 GEMMs.
  check_resume<mpopt::bf16_kahan_policy, mpopt::dynamic_scaler, mpopt::muon_gemm<mpopt::bf16_t>>(1, 2, dir);
}

TEST_CASE("muon checkpoint: a Kahan checkpoint's files hold each tensor's compensation beside its master") {
  saved_run<kahan_policy> saved("kahan_files");
  ck::index ix;
  REQUIRE(ck::read_index(saved.dir, ix).ok());
  CHECK(ix.metadata.at("precision.master_rounding") == "kahan");
  CHECK(ix.kahan());
  ck::input_file f;
  ck::safetensors_header h;
  REQUIRE(f.open(saved.dir + "/rank-00000-of-00001.safetensors").ok());
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.tensors.size() == 6 * 2 + 4 * 3 + 4 + 11);  // one compensation per checkpoint group
  CHECK(h.metadata.at("precision.master_rounding") == "kahan");
  std::size_t k = 0;
  for (muon_part part : {muon_part::matrices, muon_part::aux})
    for (std::size_t g = 0; g < 2; ++g)
      for (std::size_t t = 0; t < saved.o.num_tensors(part, g); ++t, ++k) {
        CAPTURE(k);
        const std::size_t n = saved.o.tensor_size(part, g, t);
        const ck::tensor_info* ti = h.find(ck::compensation_tensor(k));
        REQUIRE(ti != nullptr);
        CHECK(ti->dtype == "BF16");
        CHECK(ti->shape == std::vector<std::uint64_t>{n});
        std::vector<mpopt::bf16_t> got(n);
        REQUIRE(f.read(h.data_start + ti->begin, got.data(), n * 2).ok());
        const mpopt::bf16_t* want = saved.o.compensation(part, g, t);
        for (std::size_t i = 0; i < n; ++i) REQUIRE(got[i].bits == want[i].bits);
      }
  CHECK(k == 11);

  // The accessors' errors name the call, the tensor and the sizes.
  ckpt_test::check_error(ckpt_test::error_of([&] {
                           saved.o.set_local_compensation(muon_part::aux, 0, 2,
                                                          saved.o.compensation(muon_part::aux, 0, 2), 499);
                         }),
                         {"set_local_compensation: aux group 0 tensor 2 has 500 elements, got n = 499"});
  model<mpopt::fp32_policy> fm(1);
  fp32_opt fo(fm.matrices(), fm.aux());
  CHECK(fo.compensation(muon_part::matrices, 0, 0) == nullptr);
  std::vector<float> zeros(960);
  ckpt_test::check_error(
      ckpt_test::error_of([&] { fo.set_local_compensation(muon_part::matrices, 0, 0, zeros.data(), 960); }),
      {"set_local_compensation: only a master<T, kahan_summation> keeps a compensation buffer"});
}

TEST_CASE("muon checkpoint: master rounding mismatches are refused unless asked for, naming both values") {
  // A Kahan optimizer a few steps in, so that "unchanged" covers a compensation that is not zero.
  model<kahan_policy> km(5);
  kahan_opt ko(km.matrices(), km.aux());
  give_state(ko, km);
  const std::string hint = "set load_options::convert_master_rounding";

  SUBCASE("a Kahan checkpoint into nearest and stochastic rounding") {
    saved_run<kahan_policy> saved("kahan_to_other");
    model<nearest_policy> nm(5);
    opt_t<nearest_policy> no(nm.matrices(), nm.aux());
    give_state(no, nm);
    check_refused(no, nm, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"nearest\"", hint});
    model<stochastic_policy> sm(5);
    opt_t<stochastic_policy> so(sm.matrices(), sm.aux());
    check_refused(so, sm, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"stochastic\"", hint});
  }
  SUBCASE("a nearest checkpoint into Kahan") {
    saved_run<nearest_policy> saved("nearest_to_kahan");
    check_refused(ko, km, saved.dir,
                  {"\"precision.master_rounding\": checkpoint has \"nearest\", this optimizer has \"kahan\"", hint});
  }
  SUBCASE("an index that says kahan over files without a compensation") {
    saved_run<nearest_policy> saved("kahan_without_compensation");
    edit_index(saved.dir, "precision.master_rounding", "kahan");
    check_refused(ko, km, saved.dir,
                  {"rank-00000-of-00001.safetensors", "tensor \"group0.master_compensation\" is missing"});
    edit_index(saved.dir, "precision.master_rounding", "fancy");
    check_refused(ko, km, saved.dir,
                  {"metadata \"precision.master_rounding\" must be nearest, stochastic or kahan, got \"fancy\""});
  }
}

TEST_CASE(
    "muon checkpoint: convert_master_rounding folds a Kahan compensation into the master, or starts one at zero") {
  ck::load_options lo;
  lo.convert_master_rounding = true;
  std::size_t total = 0;
  for (const std::vector<matrix_shape>& g : kMatrices)
    for (const matrix_shape& sh : g) total += sh.rows * sh.cols;
  for (std::size_t n : kAuxSizes) total += n;

  SUBCASE("Kahan -> an fp32 master keeps master + compensation") {
    saved_run<kahan_policy> saved("fold_fp32");
    const snapshot<kahan_opt> want = take_muon(saved.o);
    model<mpopt::bf16_mixed_policy> wm(5);
    opt_t<mpopt::bf16_mixed_policy> wide(wm.matrices(), wm.aux());
    lo.convert_dtypes = true;  // bf16 master -> fp32
    ck::load(wide, saved.dir, lo);
    const auto got = take_muon(wide);
    std::size_t moved = 0;
    for (std::size_t g = 0; g < 4; ++g)
      for (std::size_t i = 0; i < want.master[g].size(); ++i) {
        const float w = ckpt_test::kahan_weight_ref(want.master[g][i], want.compensation[g][i]);
        REQUIRE(got.master[g][i] == w);
        moved += w != float(want.master[g][i]);
        for (std::size_t j = 0; j < want.states[g].size(); ++j)
          REQUIRE(got.states[g][j][i] == want.states[g][j][i]);  // fp32 both
      }
    CHECK(moved > total / 2);                          // the compensation was not lost
    for (std::size_t i = 0; i < wm.mp[0].size(); ++i)  // the param copy, rounded from the new master
      REQUIRE(wm.mp[0][i].bits == bf16_rne_bits(got.master[0][i]));
  }
  SUBCASE("Kahan -> a bf16 nearest master: master + compensation rounded once to bf16") {
    saved_run<kahan_policy> saved("fold_bf16");
    const snapshot<kahan_opt> want = take_muon(saved.o);
    model<nearest_policy> nm(5);
    opt_t<nearest_policy> no(nm.matrices(), nm.aux());
    ck::load(no, saved.dir, lo);
    const auto got = take_muon(no);
    for (std::size_t g = 0; g < 4; ++g)
      for (std::size_t i = 0; i < want.master[g].size(); ++i) {
        const double sum = double(float(want.master[g][i])) + double(float(want.compensation[g][i]));
        REQUIRE(double(float(sum)) == sum);  // exact in fp32, so rounding that float rounds the exact sum once
        REQUIRE(got.master[g][i].bits == bf16_rne_bits(float(sum)));
      }
    for (std::size_t g = 0; g < 2; ++g) {  // the param buffer is the master
      CHECK(ckpt_test::same_bits(nm.mp[g], got.master[g]));
      CHECK(ckpt_test::same_bits(nm.ap[g], got.master[2 + g]));
    }
  }
  SUBCASE("nearest -> Kahan starts the compensation at zero") {
    saved_run<nearest_policy> saved("nearest_to_kahan_zero");
    const auto want = take_muon(saved.o);
    model<kahan_policy> km(5);
    kahan_opt ko(km.matrices(), km.aux());
    give_state(ko, km);
    std::size_t nonzero = 0;
    for (const auto& c : take_muon(ko).compensation)
      for (const mpopt::bf16_t& v : c) nonzero += v.bits != 0;
    REQUIRE(nonzero > 0);  // so that zeroing it is seen
    ck::load(ko, saved.dir, lo);
    CHECK(ko.step_count() == 3);
    const auto got = take_muon(ko);
    for (std::size_t g = 0; g < 4; ++g) {
      CHECK(ckpt_test::same_bits(got.master[g], want.master[g]));
      for (std::size_t j = 0; j < want.states[g].size(); ++j)
        CHECK(ckpt_test::same_bits(got.states[g][j], want.states[g][j]));
      for (const mpopt::bf16_t& v : got.compensation[g]) REQUIRE(v.bits == 0);
    }
  }
}

TEST_CASE("muon checkpoint: consolidating a Kahan checkpoint writes master + compensation") {
  saved_run<kahan_policy> saved("consolidate_kahan");
  const snapshot<kahan_opt> s = take_muon(saved.o);
  const std::string out = scratch("consolidate_kahan_full.safetensors");
  ck::consolidate_options co;
  co.states = true;
  REQUIRE(ck::consolidate(saved.dir, out, co).ok());  // default dtype: fp32
  ck::input_file f;
  REQUIRE(f.open(out).ok());
  ck::safetensors_header h;
  REQUIRE(ck::read_header(f, h).ok());
  CHECK(h.metadata.at("consolidated_dtype") == "fp32");
  CHECK(h.tensors.size() == 6 * 2 + 4 * 3 + 4);  // weight and states per tensor; no compensation of its own
  auto read = [&](const std::string& name, std::size_t n) {
    const ck::tensor_info* ti = h.find(name);
    REQUIRE(ti != nullptr);
    REQUIRE(ti->dtype == "F32");
    REQUIRE(ti->elements() == n);
    std::vector<float> v(n);
    REQUIRE(f.read(h.data_start + ti->begin, v.data(), n * 4).ok());
    return v;
  };
  // Matrix 0.1 (elements [960, 1920) of matrix group 0) and aux tensor 0.2 (elements [7, 507) of aux group 0).
  std::size_t moved = 0;
  const std::vector<float> m01 = read("group1.tensor0", 960), a02 = read("group8.tensor0", 500);
  for (std::size_t i = 0; i < 960; ++i) {
    REQUIRE(m01[i] == ckpt_test::kahan_weight_ref(s.master[0][960 + i], s.compensation[0][960 + i]));
    moved += m01[i] != float(s.master[0][960 + i]);
  }
  for (std::size_t i = 0; i < 500; ++i) {
    REQUIRE(a02[i] == ckpt_test::kahan_weight_ref(s.master[2][7 + i], s.compensation[2][7 + i]));
    moved += a02[i] != float(s.master[2][7 + i]);
  }
  CHECK(moved > (960 + 500) / 2);
  CHECK(ckpt_test::same_bits(read("group1.tensor0.momentum_buffer", 960),
                             std::vector<float>(s.states[0][0].begin() + 960, s.states[0][0].begin() + 1920)));
  CHECK(ckpt_test::same_bits(read("group10.tensor0.max_exp_avg_sq", 300), s.states[3][2]));

  // bf16: the same sum, rounded once.
  co.states = false;
  co.dtype = "bf16";
  REQUIRE(ck::consolidate(saved.dir, out, co).ok());
  ck::input_file fb;
  REQUIRE(fb.open(out).ok());
  REQUIRE(ck::read_header(fb, h).ok());
  CHECK(h.tensors.size() == 11);
  const ck::tensor_info* t = h.find("group1.tensor0");
  REQUIRE(t != nullptr);
  CHECK(t->dtype == "BF16");
  std::vector<mpopt::bf16_t> b(960);
  REQUIRE(fb.read(h.data_start + t->begin, b.data(), b.size() * 2).ok());
  for (std::size_t i = 0; i < 960; ++i) {
    const double sum = double(float(s.master[0][960 + i])) + double(float(s.compensation[0][960 + i]));
    REQUIRE(double(float(sum)) == sum);
    REQUIRE(b[i].bits == bf16_rne_bits(float(sum)));
  }
}
