// Checkpoints of mpopt::cuda::optimizer (checkpoint/cuda.cuh): N steps, save, M more steps equals a fresh optimizer
// that loads and runs the M steps, bit for bit (params, master, states, step, loss scale); the host optimizer loads
// the same files with the same master and states; a checkpoint of another shape is refused with the device state
// unchanged.
#include <filesystem>
#include <string>
#include <vector>

#include "mpopt/checkpoint/cuda.cuh"
#include "test_cuda_support.cuh"

using namespace mpopt_test;

namespace {

using prec = mpopt::bf16_mixed_policy;
using opt_t = mpopt::cuda::optimizer<mpopt::adamw, prec, mpopt::dynamic_scaler>;
constexpr std::size_t kSizes[2] = {5000, 777};

struct model {
  std::vector<device_buffer<mpopt::bf16_t>> params, grads;
  std::vector<mpopt::param_group<mpopt::adamw, prec>> groups;

  model() {
    for (std::size_t g = 0; g < 2; ++g) {
      std::vector<mpopt::bf16_t> p(kSizes[g]);
      for (std::size_t i = 0; i < p.size(); ++i) p[i] = mpopt::bf16_t(float((i * 37 + g) % 200) / 100.f - 1.f);
      params.push_back(to_device(p));
      grads.emplace_back(kSizes[g], "grads");
      mpopt::param_group<mpopt::adamw, prec> spec;
      spec.params = params.back().get();
      spec.grads = grads.back().get();
      spec.size = kSizes[g];
      spec.tensor_sizes = g == 0 ? std::vector<std::size_t>{1000, 4000} : std::vector<std::size_t>{};
      spec.hparams.lr = 1e-3 * double(g + 1);
      groups.push_back(spec);
    }
  }

  void set_grads(int step) {
    for (std::size_t g = 0; g < 2; ++g) {
      std::vector<mpopt::bf16_t> v(kSizes[g]);
      for (std::size_t i = 0; i < v.size(); ++i)
        v[i] = mpopt::bf16_t(float(int((i * 131 + std::size_t(step) * 17 + g) % 401) - 200) * 1e-4f);
      copy_to(grads[g].get(), v.data(), v.size());
    }
  }
};

template <class T>
std::vector<T> device_vector(const T* p, std::size_t n) {
  MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
  return to_host(p, n);
}

std::string scratch(const char* name) {
  const auto dir = std::filesystem::temp_directory_path() / (std::string("mpopt_cuda_ckpt_") + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

}  // namespace

TEST_CASE("CUDA optimizer: save, load into a fresh optimizer, continue: the same bits as never stopping") {
  const std::string dir = scratch("resume");
  mpopt::step_options o;
  o.max_grad_norm = 1.0;
  model a, b;
  opt_t run(a.groups, {}, o);
  for (int s = 0; s < 3; ++s) {
    a.set_grads(s);
    run.step(nullptr);
  }
  mpopt::checkpoint::save(run, dir);
  const std::vector<float> master_at_save = device_vector(run.master(0), kSizes[0]);
  for (int s = 3; s < 5; ++s) {
    a.set_grads(s);
    run.step(nullptr);
  }

  opt_t resumed(b.groups, {}, o);
  mpopt::checkpoint::load(resumed, dir);
  CHECK(resumed.step_count() == 3);
  CHECK(same_bits(device_vector(resumed.master(0), kSizes[0]), master_at_save));
  CHECK(resumed.hparams(1).lr == 2e-3);
  for (int s = 3; s < 5; ++s) {
    b.set_grads(s);
    resumed.step(nullptr);
  }
  CHECK(resumed.step_count() == run.step_count());
  CHECK(resumed.scaler_state().scale == run.scaler_state().scale);
  for (std::size_t g = 0; g < 2; ++g) {
    CAPTURE(g);
    CHECK(same_bits(device_vector(resumed.params(g), kSizes[g]), device_vector(run.params(g), kSizes[g])));
    CHECK(same_bits(device_vector(resumed.master(g), kSizes[g]), device_vector(run.master(g), kSizes[g])));
    for (int j = 0; j < 2; ++j)
      CHECK(same_bits(device_vector(resumed.state(g, j), kSizes[g]), device_vector(run.state(g, j), kSizes[g])));
  }

  // The host optimizer reads the same files: the master it loads is the device's at the save.
  std::vector<std::vector<mpopt::bf16_t>> hp, hg;
  std::vector<mpopt::param_group<mpopt::adamw, prec>> hgroups;
  for (std::size_t g = 0; g < 2; ++g) {
    hp.emplace_back(kSizes[g]);
    hg.emplace_back(kSizes[g]);
    hgroups.push_back({hp[g].data(), hg[g].data(), kSizes[g], a.groups[g].tensor_sizes, {}});
  }
  mpopt::optimizer<mpopt::adamw, prec, mpopt::dynamic_scaler> host(hgroups, {}, o);
  mpopt::checkpoint::load(host, dir);
  CHECK(same_bits(std::vector<float>(host.master(0), host.master(0) + kSizes[0]), master_at_save));
  CHECK(host.step_count() == 3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("CUDA optimizer: a checkpoint of another shape is refused and the device state is unchanged") {
  const std::string dir = scratch("shape");
  model a;
  opt_t run(a.groups);
  a.set_grads(0);
  run.step(nullptr);
  mpopt::checkpoint::save(run, dir);

  model b;
  b.groups[1].size = 700;  // another model
  opt_t other(b.groups);
  const std::vector<float> before = device_vector(other.master(1), 700);
  CHECK_THROWS_AS(mpopt::checkpoint::load(other, dir), mpopt::error);
  CHECK(same_bits(device_vector(other.master(1), 700), before));
  CHECK(other.step_count() == 0);
  std::filesystem::remove_all(dir);
}
