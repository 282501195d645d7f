// Checkpoints of mpopt::cuda::muon_optimizer (checkpoint/cuda_muon.cuh): N steps, save, M more steps, against a fresh
// optimizer (other initial params) that loads and takes the same M steps: params, masters, a Kahan master's
// compensation, momentum and AdamW states, the step and the scaler state the same bits (the same GPU runs the same
// cuBLAS batches). The host Muon optimizer loads the same files with the device's state at the save, bit for bit. A
// checkpoint with other Newton–Schulz parameters is refused with the device unchanged, and loads without its
// hyper-parameters.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "mpopt/checkpoint/cuda_muon.cuh"
#include "test_cuda_support.cuh"

namespace {

using namespace mpopt_test;
using mpopt::matrix_shape;
using mpopt::muon_part;
using scaler = mpopt::dynamic_scaler;
using gemm = mpopt::muon_gemm<float>;

// A wide, a tall and an odd-sized matrix; an aux group of two tensors.
const std::vector<matrix_shape> shapes = {{48, 80}, {80, 48}, {33, 7}};
const std::vector<std::size_t> aux_tensors = {100, 201};
constexpr std::size_t aux_size = 301;
constexpr int steps_before = 4, steps_after = 3;

std::size_t matrix_size() {
  std::size_t n = 0;
  for (const matrix_shape& s : shapes) n += s.rows * s.cols;
  return n;
}

scaler::args scaler_args() {
  scaler::args s;
  s.init_scale = 256.0f;
  return s;
}

template <class T>
std::vector<T> values(std::size_t n, std::uint64_t seed, float scale, float offset = 0.0f) {
  rng r(seed);
  std::vector<T> v(n);
  for (T& x : v) x = mpopt::convert<T>(r.signed_value() * scale + offset);
  return v;
}

using snapshot = std::map<std::string, std::vector<unsigned char>>;

template <class T>
std::vector<unsigned char> raw(const std::vector<T>& v) {
  std::vector<unsigned char> b(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::string differences(const snapshot& a, const snapshot& b) {
  std::string out;
  for (const auto& [name, bytes] : a) {
    const auto it = b.find(name);
    if (it == b.end() || it->second != bytes) out += name + "; ";
  }
  return out;
}

template <class Prec>
struct model {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  using opt_type = mpopt::cuda::muon_optimizer<Prec, scaler, gemm>;
  device_buffer<param_t> matrix_params, aux_params;
  device_buffer<grad_t> matrix_grads, aux_grads;
  std::optional<opt_type> opt;

  model(float init, int ns_steps = 5)
      : matrix_params(to_device(values<param_t>(matrix_size(), 11, 1.0f, init))),
        aux_params(to_device(values<param_t>(aux_size, 12, 1.0f, init))),
        matrix_grads(to_device(std::vector<grad_t>(matrix_size()))),
        aux_grads(to_device(std::vector<grad_t>(aux_size))) {
    mpopt::muon_group<Prec> m;
    m.params = matrix_params.get();
    m.grads = matrix_grads.get();
    m.shapes = shapes;
    m.hparams.lr = 0.02;
    m.hparams.weight_decay = 0.01;
    m.hparams.ns_steps = ns_steps;
    mpopt::param_group<mpopt::adamw, Prec> a;
    a.params = aux_params.get();
    a.grads = aux_grads.get();
    a.size = aux_size;
    a.tensor_sizes = aux_tensors;
    a.hparams.lr = 1e-2;
    a.hparams.weight_decay = 0.1;
    opt.emplace(std::vector<mpopt::muon_group<Prec>>{m}, std::vector<mpopt::param_group<mpopt::adamw, Prec>>{a},
                scaler_args());
  }

  void steps(int first, int last) {
    for (int k = first; k <= last; ++k) {
      const std::vector<grad_t> mg = values<grad_t>(matrix_size(), 100 + std::uint64_t(k), 256.0f);
      const std::vector<grad_t> ag = values<grad_t>(aux_size, 200 + std::uint64_t(k), 256.0f);
      copy_to(matrix_grads.get(), mg.data(), mg.size());
      copy_to(aux_grads.get(), ag.data(), ag.size());
      opt->step(nullptr);
      const mpopt::step_result r = opt->result(nullptr);
      REQUIRE(r.error.ok());
      REQUIRE(r.applied);
    }
  }

  snapshot state() const {
    snapshot s;
    s["matrix params"] = raw(to_host(matrix_params.get(), matrix_size()));
    s["aux params"] = raw(to_host(aux_params.get(), aux_size));
    for (muon_part part : {muon_part::matrices, muon_part::aux}) {
      const std::string p = part == muon_part::matrices ? "matrix " : "aux ";
      const std::size_t n = part == muon_part::matrices ? matrix_size() : aux_size;
      s[p + "master"] = raw(to_host(opt->master(part, 0), n));
      if (opt->compensation(part, 0) != nullptr) s[p + "compensation"] = raw(to_host(opt->compensation(part, 0), n));
      const int states = part == muon_part::matrices ? 1 : 2;
      for (int j = 0; j < states; ++j) s[p + "state " + std::to_string(j)] = raw(to_host(opt->state(part, 0, j), n));
    }
    const std::int64_t step = opt->step_count(nullptr);
    s["step"] = raw(std::vector<std::int64_t>{step});
    s["scaler"] = raw(std::vector<scaler::state_type>{opt->scaler_state(nullptr)});
    return s;
  }
};

std::string scratch(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("mpopt_cuda_muon_ckpt_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// The host optimizer's state, in the device snapshot's names (params excluded: the host rewrites its own).
template <class Prec>
snapshot host_state(const mpopt::muon_optimizer<Prec, scaler, gemm>& h) {
  snapshot s;
  for (muon_part part : {muon_part::matrices, muon_part::aux}) {
    const std::string p = part == muon_part::matrices ? "matrix " : "aux ";
    std::vector<typename Prec::master_t> master, compensation;
    std::vector<std::vector<typename Prec::state_t>> states(std::size_t(h.num_states(part, 0)));
    for (std::size_t t = 0; t < h.num_tensors(part, 0); ++t) {
      const std::size_t n = h.tensor_size(part, 0, t);
      const auto* m = h.master(part, 0, t);
      master.insert(master.end(), m, m + n);
      if (const auto* c = h.compensation(part, 0, t)) compensation.insert(compensation.end(), c, c + n);
      for (int j = 0; j < h.num_states(part, 0); ++j) {
        const auto* st = h.state(part, 0, t, j);
        states[std::size_t(j)].insert(states[std::size_t(j)].end(), st, st + n);
      }
    }
    s[p + "master"] = raw(master);
    if (!compensation.empty()) s[p + "compensation"] = raw(compensation);
    for (std::size_t j = 0; j < states.size(); ++j) s[p + "state " + std::to_string(j)] = raw(states[j]);
  }
  s["step"] = raw(std::vector<std::int64_t>{h.step_count()});
  s["scaler"] = raw(std::vector<scaler::state_type>{h.scaler_state()});
  return s;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda muon: save, load, continue gives the bits of never stopping; the host reads the same state",
                   Prec, fp32, mpopt::bf16_kahan_policy) {
  const std::string dir = scratch("resume");
  model<Prec> saved(0.0f);
  saved.steps(1, steps_before);
  mpopt::checkpoint::save(*saved.opt, dir);
  snapshot at_save = saved.state();
  saved.steps(steps_before + 1, steps_before + steps_after);

  model<Prec> loaded(0.5f);
  mpopt::checkpoint::load(*loaded.opt, dir);
  loaded.steps(steps_before + 1, steps_before + steps_after);
  CHECK(differences(saved.state(), loaded.state()) == "");

  using param_t = typename Prec::param_t;
  std::vector<param_t> hp(matrix_size()), ap(aux_size);
  std::vector<typename Prec::grad_t> hg(matrix_size()), ag(aux_size);
  mpopt::muon_group<Prec> m;
  m.params = hp.data();
  m.grads = hg.data();
  m.shapes = shapes;
  mpopt::param_group<mpopt::adamw, Prec> a;
  a.params = ap.data();
  a.grads = ag.data();
  a.size = aux_size;
  a.tensor_sizes = aux_tensors;
  mpopt::muon_optimizer<Prec, scaler, gemm> host({m}, {a}, scaler_args());
  mpopt::checkpoint::load(host, dir);
  at_save.erase("matrix params");
  at_save.erase("aux params");
  CHECK(differences(at_save, host_state(host)) == "");
  CHECK(host.matrix_hparams(0).lr == 0.02);
}

TEST_CASE("cuda muon: a checkpoint with other Newton-Schulz steps is refused with the device unchanged") {
  const std::string dir = scratch("ns");
  {
    model<fp32> five(0.0f, 5);
    five.steps(1, 2);
    mpopt::checkpoint::save(*five.opt, dir);
  }
  model<fp32> four(0.25f, 4);
  four.steps(1, 1);
  const snapshot before = four.state();
  CHECK_THROWS_WITH_AS(mpopt::checkpoint::load(*four.opt, dir), doctest::Contains("ns_steps"), mpopt::error);
  CHECK(differences(before, four.state()) == "");
  mpopt::checkpoint::load_options keep;
  keep.restore_hparams = false;
  mpopt::checkpoint::load(*four.opt, dir, keep);
  CHECK(four.opt->step_count(nullptr) == 2);
  CHECK(four.opt->matrix_hparams(0).ns_steps == 4);
}
