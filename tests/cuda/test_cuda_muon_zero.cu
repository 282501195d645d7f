// mpopt::cuda::muon_optimizer with ZeRO stages 0-2 at world sizes 1-4, every rank a host thread on one GPU
// (threaded_comm.cuh), against the same optimizer on one GPU without a communicator.
//
// Every rank feeds the same global grads, so their mean is the grads themselves (reduced in fp32, fp64 for fp32
// grads: exact). The aux AdamW tensors run the same kernels on the same inputs as on one GPU: params, masters and
// states the same bits. A matrix's Newton–Schulz runs on its owner in that rank's batch of equal shapes, which can
// hold fewer matrices than the one-GPU batch, and cuBLAS may pick another algorithm for another batch count: the
// matrices' params are compared within 1e-5 of the distance they moved (the host-vs-GPU bound is 2e-5), and bit for
// bit at stage 0 and at one rank, where the batches are the one-GPU ones. An inf planted on one rank must skip the
// step on every rank. Stage 2 is fed by reduce_grads() on even steps and by step()'s own reduction on odd ones.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "mpopt/checkpoint/cuda_muon.cuh"
#include "mpopt/cuda/muon.cuh"
#include "test_cuda_support.cuh"
#include "threaded_comm.cuh"

namespace {

using namespace mpopt_test;
using mpopt::matrix_shape;
using mpopt::muon_part;
using gemm = mpopt::muon_gemm<float>;

constexpr int num_steps = 5;
constexpr int overflow_step = 3;  // 1-based; with a skipping scaler, an inf on the last rank
// Equal shapes that the owners split, a square one and an odd one; aux tensors with a zero-sized one.
const std::vector<matrix_shape> shapes = {{48, 80}, {80, 48}, {48, 80}, {33, 7}, {64, 64}, {48, 80}};
const std::vector<std::size_t> aux_tensors = {100, 0, 201, 5000, 3};

std::size_t matrix_size() {
  std::size_t n = 0;
  for (const matrix_shape& s : shapes) n += s.rows * s.cols;
  return n;
}
std::size_t aux_size() {
  std::size_t n = 0;
  for (std::size_t s : aux_tensors) n += s;
  return n;
}

template <class T>
std::vector<T> values(std::size_t n, std::uint64_t seed, float scale) {
  rng r(seed);
  std::vector<T> v(n);
  for (T& x : v) x = mpopt::convert<T>(r.signed_value() * scale);
  return v;
}

// What one run records after each step: params (both parts, as float) and the step result.
struct trajectory {
  std::vector<std::vector<float>> matrix_params, aux_params;
  std::vector<mpopt::step_result> results;
  mpopt::memory_report memory;
};

template <class Prec, class Scaler>
struct setup {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  using opt_type = mpopt::cuda::muon_optimizer<Prec, Scaler, gemm>;
  typename Scaler::args scaler{};
  float grad_scale = 1.0f;

  std::vector<grad_t> matrix_grads(int step, int rank, int world) const {
    std::vector<grad_t> g = values<grad_t>(matrix_size(), 100 + std::uint64_t(step), grad_scale);
    if (Scaler::skips_on_overflow(scaler) && step == overflow_step && rank == world - 1)
      g[7] = mpopt::convert<grad_t>(INFINITY);
    return g;
  }
  std::vector<grad_t> aux_grads(int step) const {
    return values<grad_t>(aux_size(), 200 + std::uint64_t(step), grad_scale);
  }

  // One rank (comm null: the one-GPU reference).
  trajectory run(mpopt::comm::communicator* comm, cudaStream_t stream, int stage, int rank, int world) const {
    device_buffer<param_t> mp = to_device(values<param_t>(matrix_size(), 11, 1.0f));
    device_buffer<param_t> ap = to_device(values<param_t>(aux_size(), 12, 1.0f));
    device_buffer<grad_t> mg = to_device(std::vector<grad_t>(matrix_size()));
    device_buffer<grad_t> ag = to_device(std::vector<grad_t>(aux_size()));
    device_buffer<grad_t> fed = to_device(std::vector<grad_t>(std::max(matrix_size(), aux_size())));
    mpopt::muon_group<Prec> m;
    m.params = mp.get();
    m.grads = mg.get();
    m.shapes = shapes;
    m.hparams.lr = 0.02;
    m.hparams.weight_decay = 0.01;
    mpopt::param_group<mpopt::adamw, Prec> a;
    a.params = ap.get();
    a.grads = ag.get();
    a.size = aux_size();
    a.tensor_sizes = aux_tensors;
    a.hparams.lr = 1e-2;
    a.hparams.weight_decay = 0.1;
    std::optional<opt_type> opt;
    if (comm != nullptr) {
      mpopt::zero_options z;
      z.stage = stage;
      z.bucket_elements = 3000;  // several buckets, pieces cutting through tensors
      opt.emplace(std::vector<mpopt::muon_group<Prec>>{m}, std::vector<mpopt::param_group<mpopt::adamw, Prec>>{a},
                  *comm, z, scaler, mpopt::step_options{}, stream);
    } else {
      opt.emplace(std::vector<mpopt::muon_group<Prec>>{m}, std::vector<mpopt::param_group<mpopt::adamw, Prec>>{a},
                  scaler, mpopt::step_options{}, stream);
    }
    trajectory t;
    for (int k = 1; k <= num_steps; ++k) {
      const std::vector<grad_t> gm = matrix_grads(k, rank, world), ga = aux_grads(k);
      if (stage == 2 && k % 2 == 0) {  // tensor by tensor through reduce_grads, from one reused buffer
        copy_to(fed.get(), gm.data(), gm.size());
        opt->reduce_grads(muon_part::matrices, 0, 0, 3, fed.get(), stream);
        opt->reduce_grads(muon_part::matrices, 0, 3, shapes.size(), fed.get() + 48 * 80 * 3, stream);
        MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
        copy_to(fed.get(), ga.data(), ga.size());
        opt->reduce_grads(muon_part::aux, 0, 0, aux_tensors.size(), fed.get(), stream);
        MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
      } else {
        copy_to(mg.get(), gm.data(), gm.size());
        copy_to(ag.get(), ga.data(), ga.size());
      }
      opt->step(stream);
      t.results.push_back(opt->result(stream));
      std::vector<float> pm, pa;
      for (const param_t& x : to_host(mp.get(), matrix_size())) pm.push_back(mpopt::convert<float>(x));
      for (const param_t& x : to_host(ap.get(), aux_size())) pa.push_back(mpopt::convert<float>(x));
      t.matrix_params.push_back(pm);
      t.aux_params.push_back(pa);
    }
    t.memory = opt->memory();
    return t;
  }
};

template <class Prec, class Scaler>
void check_all_worlds(const setup<Prec, Scaler>& s) {
  const trajectory ref = s.run(nullptr, nullptr, 0, 0, 1);
  const std::vector<float> initial = [] {
    std::vector<float> v;
    for (const auto& x : values<typename Prec::param_t>(matrix_size(), 11, 1.0f)) v.push_back(mpopt::convert<float>(x));
    return v;
  }();
  for (const auto& r : ref.results) REQUIRE(r.error.ok());
  for (int world = 1; world <= 4; ++world) {
    for (int stage = 0; stage <= 2; ++stage) {
      std::vector<trajectory> runs(static_cast<std::size_t>(world));
      run_ranks(world, [&](int rank, threaded_device_comm& comm) {
        runs[std::size_t(rank)] = s.run(&comm, comm.stream(), stage, rank, world);
      });
      std::size_t states = 0;
      for (int rank = 0; rank < world; ++rank) {
        INFO("world ", world, ", stage ", stage, ", rank ", rank);
        const trajectory& t = runs[std::size_t(rank)];
        states += t.memory.states;
        for (int k = 0; k < num_steps; ++k) {
          INFO("step ", k + 1);
          const mpopt::step_result &a = t.results[std::size_t(k)], &b = ref.results[std::size_t(k)];
          CHECK(a.error.ok());
          CHECK(a.applied == b.applied);
          CHECK(a.loss_scale == b.loss_scale);
          CHECK(a.next_loss_scale == b.next_loss_scale);
          CHECK(a.step == b.step);
          CHECK(same_bits(t.aux_params[std::size_t(k)], ref.aux_params[std::size_t(k)]));
          const std::vector<float>&p = t.matrix_params[std::size_t(k)], &q = ref.matrix_params[std::size_t(k)];
          if (stage == 0 || world == 1) {
            CHECK(same_bits(p, q));
          } else {
            double moved = 0, diff = 0;
            for (std::size_t i = 0; i < q.size(); ++i) {
              moved = std::max(moved, std::fabs(double(q[i]) - double(initial[i])));
              diff = std::max(diff, std::fabs(double(p[i]) - double(q[i])));
            }
            CHECK(diff <= 1e-5 * moved);
          }
          // Every rank holds the same params after the all-gather.
          CHECK(same_bits(p, runs[0].matrix_params[std::size_t(k)]));
        }
        if (Scaler::skips_on_overflow(s.scaler)) CHECK_FALSE(t.results[overflow_step - 1].applied);
      }
      INFO("world ", world, ", stage ", stage);
      // Each tensor's states live on its owner alone at stages 1-2, on every rank at stage 0.
      CHECK(states == (stage == 0 ? std::size_t(world) : 1u) * ref.memory.states);
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda muon ZeRO stages 0-2 at 1-4 ranks reproduce one GPU (aux bit for bit)", Prec, mpopt_test::fp32,
                   mpopt_test::bf16_mixed) {
  setup<Prec, mpopt::no_scaler> s;
  check_all_worlds(s);
}

TEST_CASE("cuda muon ZeRO with fp16 dynamic loss scaling: an inf on one rank skips the step everywhere") {
  setup<mpopt_test::fp16_mixed, mpopt::dynamic_scaler> s;
  s.scaler.init_scale = 1024.0f;
  s.grad_scale = 1024.0f;
  check_all_worlds(s);
}

TEST_CASE("cuda muon ZeRO: a checkpoint of 3 ranks at stage 1 loads on one GPU with every owner's tensors") {
  using Prec = mpopt_test::fp32;
  using opt_type = mpopt::cuda::muon_optimizer<Prec, mpopt::no_scaler, gemm>;
  const auto dir = (std::filesystem::temp_directory_path() / "mpopt_cuda_muon_zero_ckpt").string();
  std::filesystem::remove_all(dir);
  // Every held tensor's master and momentum at the save, by (part, tensor).
  std::vector<std::map<std::pair<int, std::size_t>, std::vector<float>>> held(3);
  auto make = [](float* params, float* grads) {
    mpopt::muon_group<Prec> m;
    m.params = params;
    m.grads = grads;
    m.shapes = shapes;
    mpopt::param_group<mpopt::adamw, Prec> a;
    a.params = params + matrix_size();
    a.grads = grads + matrix_size();
    a.size = aux_size();
    a.tensor_sizes = aux_tensors;
    return std::make_pair(std::vector<mpopt::muon_group<Prec>>{m},
                          std::vector<mpopt::param_group<mpopt::adamw, Prec>>{a});
  };
  const std::size_t n = matrix_size() + aux_size();
  run_ranks(3, [&](int rank, threaded_device_comm& comm) {
    device_buffer<float> p = to_device(values<float>(n, 21, 1.0f)), g = to_device(values<float>(n, 22, 1.0f));
    auto [m, a] = make(p.get(), g.get());
    mpopt::zero_options z;
    z.stage = 1;
    opt_type opt(m, a, comm, z, {}, {}, comm.stream());
    for (int k = 0; k < 2; ++k) opt.step(comm.stream());
    mpopt::checkpoint::save(opt, dir, {}, comm.stream());
    for (muon_part part : {muon_part::matrices, muon_part::aux})
      for (std::size_t t = 0; t < opt.num_tensors(part, 0); ++t)
        if (opt.holds(part, 0, t)) {
          const std::size_t size = opt.tensor_size(part, 0, t);
          std::vector<float> v = to_host(opt.master(part, 0, t), size), s = to_host(opt.state(part, 0, t, 0), size);
          v.insert(v.end(), s.begin(), s.end());
          held[std::size_t(rank)][{int(part), t}] = v;
        }
  });
  device_buffer<float> p = to_device(std::vector<float>(n, 0.0f)), g = to_device(std::vector<float>(n, 0.0f));
  auto [m, a] = make(p.get(), g.get());
  opt_type one(m, a);
  mpopt::checkpoint::load(one, dir);
  CHECK(one.step_count(nullptr) == 2);
  std::size_t found = 0;
  for (muon_part part : {muon_part::matrices, muon_part::aux})
    for (std::size_t t = 0; t < one.num_tensors(part, 0); ++t) {
      const std::size_t size = one.tensor_size(part, 0, t);
      std::vector<float> v = to_host(one.master(part, 0, t), size), s = to_host(one.state(part, 0, t, 0), size);
      v.insert(v.end(), s.begin(), s.end());
      for (const auto& rank : held) {
        const auto it = rank.find({int(part), t});
        if (it == rank.end()) continue;
        ++found;
        INFO("part ", int(part), ", tensor ", t);
        CHECK(same_bits(v, it->second));
      }
    }
  CHECK(found == shapes.size() + aux_tensors.size());  // every tensor had exactly one owner
}

TEST_CASE("cuda muon ZeRO: stage 3, a host communicator and a foreign stream are refused") {
  using opt_type = mpopt::cuda::muon_optimizer<mpopt_test::fp32>;
  device_buffer<float> p = to_device(values<float>(64, 1, 1.0f)), g = to_device(values<float>(64, 2, 1.0f));
  mpopt::muon_group<mpopt_test::fp32> m;
  m.params = p.get();
  m.grads = g.get();
  m.shapes = {{8, 8}};
  std::vector<std::string> failures(1);
  run_ranks(1, [&](int, threaded_device_comm& comm) {
    std::string& f = failures[0];
    mpopt::zero_options z;
    z.stage = 3;
    try {
      opt_type o({m}, {}, comm, z, {}, {}, comm.stream());
      f += "stage 3 constructed; ";
    } catch (const mpopt::error& e) {
      if (std::string(e.what()).find("stage 3 is not supported") == std::string::npos) f += e.what();
    }
    z.stage = 1;
    cudaStream_t other = nullptr;
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&other));
    try {
      opt_type o({m}, {}, comm, z, {}, {}, other);
      f += "constructed on a foreign stream; ";
    } catch (const mpopt::error& e) {
      if (std::string(e.what()).find("communicator's stream") == std::string::npos) f += e.what();
    }
    (void)cudaStreamDestroy(other);
  });
  CHECK(failures[0] == "");
  mpopt::comm::single_rank host_comm;
  CHECK_THROWS_WITH_AS(opt_type({m}, {}, host_comm, mpopt::zero_options{}), doctest::Contains("device-memory"),
                       mpopt::error);
}
