// mpopt::cuda::offload_optimizer (CPU offload) against mpopt::optimizer on host copies of the same data: the device
// params after every step, the step results and the host master, bit for bit, with clipping, a dynamic loss scaler
// and an overflow step, and streaming pieces without grad statistics; upload_params after a host-side change; and
// the construction errors.
#include <limits>
#include <string>
#include <vector>

#include "mpopt/cuda/offload.cuh"
#include "test_cuda_support.cuh"

using namespace mpopt_test;

namespace {

constexpr std::size_t kSizes[3] = {30000, 0, 9001};

template <class Rule, class Prec, class Scaler>
struct offload_run {
  using P = typename Prec::param_t;
  using G = typename Prec::grad_t;
  std::vector<std::vector<P>> ref_params;
  std::vector<std::vector<G>> ref_grads;
  std::vector<device_buffer<P>> d_params;
  std::vector<device_buffer<G>> d_grads;

  std::vector<mpopt::param_group<Rule, Prec>> groups(bool device) {
    std::vector<mpopt::param_group<Rule, Prec>> gs;
    for (std::size_t g = 0; g < 3; ++g) {
      mpopt::param_group<Rule, Prec> spec;
      spec.size = kSizes[g];
      spec.params = device ? d_params[g].get() : ref_params[g].data();
      spec.grads = device ? d_grads[g].get() : ref_grads[g].data();
      if (g == 0) spec.tensor_sizes = {12000, 0, 18000};
      gs.push_back(spec);
    }
    return gs;
  }

  offload_run() {
    for (std::size_t g = 0; g < 3; ++g) {
      ref_params.emplace_back(kSizes[g]);
      ref_grads.emplace_back(kSizes[g]);
      for (std::size_t i = 0; i < kSizes[g]; ++i)
        ref_params[g][i] = mpopt::convert<P>(float(double((i * 7919 + g) % 1000) / 500.0 - 1.0));
      d_params.push_back(to_device(ref_params[g]));
      d_grads.emplace_back(kSizes[g], "grads");
    }
  }

  void set_grads(int step) {
    for (std::size_t g = 0; g < 3; ++g) {
      for (std::size_t i = 0; i < kSizes[g]; ++i)
        ref_grads[g][i] =
            mpopt::convert<G>(float(double((i * 104729 + std::size_t(step) * 31 + g) % 2001) / 1000.0 - 1.0) * 1e-2f);
      if (step == 2 && g == 2) ref_grads[g][17] = mpopt::convert<G>(std::numeric_limits<float>::infinity());
      copy_to(d_grads[g].get(), ref_grads[g].data(), kSizes[g]);
    }
  }
};

template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
void check_against_host(typename Scaler::args sa = {}, mpopt::step_options o = {}) {
  offload_run<Rule, Prec, Scaler> r;
  mpopt::optimizer<Rule, Prec, Scaler> ref(r.groups(false), sa, o);
  mpopt::cuda::offload_options off;
  off.piece_elements = 4096;
  mpopt::cuda::offload_optimizer<Rule, Prec, Scaler> opt(r.groups(true), sa, o, off);
  cudaStream_t stream = nullptr;
  MPOPT_CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    r.set_grads(step);
    const mpopt::step_result want = ref.step();
    const mpopt::step_result got = opt.step(stream);
    INFO(got.error.message);
    REQUIRE(got.error.ok());
    CHECK(got.applied == want.applied);
    // The same double, NaN included (no statistics: neither an overflow check nor clipping).
    CHECK(same_bits(std::vector<double>{got.grad_norm}, std::vector<double>{want.grad_norm}));
    CHECK(got.loss_scale == want.loss_scale);
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    for (std::size_t g = 0; g < 3; ++g) {
      CAPTURE(g);
      CHECK(same_bits(to_host(r.d_params[g].get(), kSizes[g]), r.ref_params[g]));
      const auto* m = opt.host().master(g);
      const auto* want_m = ref.master(g);
      CHECK(same_bits(std::vector<typename Prec::master_t>(m, m + kSizes[g]),
                      std::vector<typename Prec::master_t>(want_m, want_m + kSizes[g])));
    }
  }
  const auto mem = opt.memory();
  CHECK(mem.device == (kSizes[0] + kSizes[2]) * (sizeof(typename Prec::param_t) + sizeof(typename Prec::grad_t)));
  CHECK(mem.pinned == mem.device);
  MPOPT_CUDA_REQUIRE(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("offload: AdamW with bf16 params and an fp32 master on the host, clipped; an overflow step is skipped") {
  mpopt::step_options clip;
  clip.max_grad_norm = 0.5;
  check_against_host<mpopt::adamw, mpopt::bf16_mixed_policy>({}, clip);
}

TEST_CASE("offload: fp16 params with a dynamic loss scaler") {
  mpopt::dynamic_scaler::args sa;
  sa.hysteresis = 1;
  check_against_host<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(sa);
}

TEST_CASE("offload: without grad statistics the pieces stream (Lion, unchecked), and LAMB takes groups whole") {
  mpopt::no_scaler::args unchecked;
  unchecked.check_overflow = false;
  check_against_host<mpopt::lion, mpopt::bf16_mixed_policy>(unchecked);
  mpopt::step_options clip;
  clip.max_grad_norm = 1.0;
  check_against_host<mpopt::lamb, mpopt::bf16_mixed_policy>({}, clip);
}

TEST_CASE("offload: upload_params copies a host-side change to the device") {
  offload_run<mpopt::adamw, mpopt::bf16_mixed_policy, mpopt::no_scaler> r;
  mpopt::cuda::offload_optimizer<mpopt::adamw, mpopt::bf16_mixed_policy> opt(r.groups(true));
  std::vector<float> values(kSizes[0]);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = 0.001f * float(i);
  opt.host().set_master(0, values.data(), values.size());
  opt.upload_params(nullptr);
  MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
  const std::vector<mpopt::bf16_t> got = to_host(r.d_params[0].get(), kSizes[0]);
  for (std::size_t i = 0; i < values.size(); ++i) CHECK(float(got[i]) == float(mpopt::bf16_t(values[i])));
}

TEST_CASE("offload: construction errors name the argument and the value") {
  offload_run<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> r;
  using opt_t = mpopt::cuda::offload_optimizer<mpopt::adamw, mpopt::fp32_policy>;
  mpopt::cuda::offload_options bad;
  bad.piece_elements = 1000;
  CHECK_THROWS_WITH_AS(opt_t(r.groups(true), {}, {}, bad),
                       "offload_options.piece_elements must be a positive multiple of 4096, got 1000", mpopt::error);
  auto host_params = r.groups(true);
  host_params[0].params = r.ref_params[0].data();  // host memory where device memory belongs
  try {
    opt_t o(host_params);
    FAIL("host params must be refused");
  } catch (const mpopt::error& e) {
    CHECK(std::string(e.what()).find("group 0: params") != std::string::npos);
    CHECK(std::string(e.what()).find("is host memory, not device memory") != std::string::npos);
  }
}
