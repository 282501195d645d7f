// mpopt::cuda::optimizer's step semantics against mpopt::optimizer (the host backend): scaler sequences, overflow
// skips that leave every buffer untouched, clipping, error_at_min, the scale-order option, many groups (a tensor
// table far above the 4 KB kernel-argument limit) with an lr schedule, LAMB's per-tensor trust ratios, validation
// messages, and a whole step captured in a CUDA graph and replayed against uncaptured steps, bit for bit; and the
// gradient-accumulation kernel against the host loop.
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "mpopt/cuda/grad_accumulation.cuh"
#include "mpopt/grad_accumulation.hpp"
#include "test_cuda_support.cuh"

using namespace mpopt_test;

namespace {

template <class Rule>
std::vector<group_spec<Rule>> two_groups(const typename Rule::args& a) {
  std::vector<group_spec<Rule>> g(2);
  g[0].size = 3001;
  g[0].hparams = a;
  g[1].size = 700;
  g[1].offset = 3;
  g[1].hparams = a;
  return g;
}

template <class T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Every device buffer of a twin: params, master, states.
template <class Twin>
std::vector<std::vector<unsigned char>> snapshot(Twin& t) {
  std::vector<std::vector<unsigned char>> out;
  auto grab = [&out](const void* p, std::size_t bytes) {
    std::vector<unsigned char> v(bytes);
    if (bytes > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost));
    out.push_back(std::move(v));
  };
  for (std::size_t g = 0; g < t.specs.size(); ++g) {
    const std::size_t n = t.specs[g].size;
    grab(t.dparam(g), n * sizeof(typename Twin::P));
    grab(t.dev->master(g), n * sizeof(typename Twin::M));
    for (int j = 0; j < t.dev->num_states(g); ++j) grab(t.dev->state(g, j), n * sizeof(typename Twin::S));
  }
  return out;
}

// One lockstep step of a twin with `inf_at` planted in the grads (-1: none); returns the host's result.
template <class Twin>
mpopt::step_result lockstep_step(Twin& t, int index, long inf_at) {
  const float scale = float(t.host->loss_scale());
  t.new_grads(scale, inf_at);
  std::vector<std::vector<double>> in_scale;
  for (std::size_t g = 0; g < t.specs.size(); ++g) in_scale.push_back(t.input_scale(g, 1.0 / double(scale)));
  const mpopt::step_result h = t.step(index);
  t.compare(in_scale, index);
  t.sync_device_from_host();
  return h;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const mpopt::error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("dynamic loss scaling: the device runs the host's scaler sequence, state for state") {
  using prec = fp16_mixed;
  mpopt::adamw::args a;
  a.lr = 1e-3;
  // Overflow runs of every length around hysteresis 2, and clean runs around the window of 3.
  const std::vector<int> overflow = {0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1,
                                     1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};

  SUBCASE("DeepSpeed preset, window 3, hysteresis 2") {
    mpopt::dynamic_scale_args s;
    s.scale_window = 3;
    s.min_scale = 1024.f;
    s.error_at_min = false;
    twin<mpopt::adamw, prec, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a), s);
    for (std::size_t i = 0; i < overflow.size(); ++i) {
      lockstep_step(t, int(i), overflow[i] ? long(i) : -1);
      CHECK(same_bytes(t.dev->scaler_state(t.stream), t.host->scaler_state()));
    }
    CHECK(t.dev->step_count(t.stream) == t.host->step_count());
    float next = 0;
    MPOPT_CUDA_REQUIRE(cudaMemcpy(&next, t.dev->device_loss_scale(), sizeof next, cudaMemcpyDeviceToHost));
    CHECK(double(next) == t.host->loss_scale());
  }
  SUBCASE("DeepSpeed preset, consecutive hysteresis") {
    mpopt::dynamic_scale_args s;
    s.scale_window = 2;
    s.hysteresis = 3;
    s.consecutive_hysteresis = true;
    s.error_at_min = false;
    s.min_scale = 256.f;
    twin<mpopt::adamw, prec, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a), s);
    for (std::size_t i = 0; i < overflow.size(); ++i) {
      lockstep_step(t, int(i), overflow[i] ? long(i) : -1);
      CHECK(same_bytes(t.dev->scaler_state(t.stream), t.host->scaler_state()));
    }
  }
  SUBCASE("torch GradScaler preset, window 4") {
    mpopt::dynamic_scale_args s = mpopt::dynamic_scale_args::torch_grad_scaler();
    s.scale_window = 4;
    s.init_scale = 4096.f;
    twin<mpopt::adamw, prec, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a), s);
    for (std::size_t i = 0; i < overflow.size(); ++i) {
      lockstep_step(t, int(i), overflow[i] ? long(i) : -1);
      CHECK(same_bytes(t.dev->scaler_state(t.stream), t.host->scaler_state()));
    }
  }
  SUBCASE("static scaler: overflows skip, the scale stays") {
    mpopt::static_scaler::args s;
    s.scale = 512.f;
    twin<mpopt::adamw, prec, mpopt::static_scaler> t(two_groups<mpopt::adamw>(a), s);
    for (std::size_t i = 0; i < 12; ++i) lockstep_step(t, int(i), overflow[i] ? long(i) : -1);
    CHECK(t.dev->step_count(t.stream) == t.host->step_count());
  }
}

TEST_CASE("an overflow step leaves every device buffer bit-identical") {
  mpopt::adamw::args a;
  a.lr = 1e-2;
  a.weight_decay = 0.1;

  SUBCASE("fp16 with dynamic scaling: the overflow is absorbed by the hysteresis, then backs off") {
    twin<mpopt::adamw, fp16_mixed, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a));
    for (int i = 0; i < 3; ++i) lockstep_step(t, i, -1);
    for (int i = 3; i < 5; ++i) {
      const auto before = snapshot(t);
      const auto scaler_before = t.dev->scaler_state(t.stream);
      const mpopt::step_result h = lockstep_step(t, i, 1234);
      CHECK_FALSE(h.applied);
      CHECK(h.reason == mpopt::skip_reason::nonfinite_grads);
      CHECK(snapshot(t) == before);
      CHECK_FALSE(same_bytes(t.dev->scaler_state(t.stream), scaler_before));  // the scaler did move
      CHECK(same_bytes(t.dev->scaler_state(t.stream), t.host->scaler_state()));
    }
    CHECK(t.dev->step_count(t.stream) == 3);
  }
  SUBCASE("bf16 without a scaler: a NaN gradient skips the step") {
    twin<mpopt::adamw, bf16_mixed> t(two_groups<mpopt::adamw>(a));
    lockstep_step(t, 0, -1);
    const auto before = snapshot(t);
    t.new_grads(1.f);
    const bf16_t nan_value = mpopt::convert<bf16_t>(NAN);
    copy_to(t.dgrad(1) + 699, &nan_value, 1);  // the last element of the unaligned group: the scalar path
    t.h_grads[1][699] = nan_value;
    const mpopt::step_result h = t.step(1);
    CHECK_FALSE(h.applied);
    CHECK(snapshot(t) == before);
  }
}

TEST_CASE("error_at_min: an overflow at the minimum scale is an error and changes nothing") {
  mpopt::dynamic_scale_args s;
  s.init_scale = 2.f;
  s.min_scale = 1.f;
  s.hysteresis = 1;
  s.error_at_min = true;
  mpopt::adamw::args a;
  twin<mpopt::adamw, fp16_mixed, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a), s);
  lockstep_step(t, 0, 5);  // backs off to 1
  const auto before = snapshot(t);
  const auto scaler_before = t.dev->scaler_state(t.stream);
  const mpopt::step_result h = lockstep_step(t, 1, 5);  // at the minimum: error
  CHECK(h.error.code == mpopt::errc::scale_at_minimum);
  CHECK(h.event == mpopt::scale_event::error_at_min);
  CHECK(snapshot(t) == before);
  CHECK(same_bytes(t.dev->scaler_state(t.stream), scaler_before));
  const mpopt::step_result ok = lockstep_step(t, 2, -1);
  CHECK(ok.applied);
  CHECK(t.dev->step_count(t.stream) == 1);
}

TEST_CASE("clipping and the DeepSpeed scale order match the host") {
  mpopt::adamw::args a;
  a.lr = 1e-2;
  mpopt::step_options o;
  o.max_grad_norm = 0.5;  // the gradients' norm is about 10: every step clips

  SUBCASE("bf16, clipping") {
    twin<mpopt::adamw, bf16_mixed> t(two_groups<mpopt::adamw>(a), {}, o);
    for (int i = 0; i < 6; ++i) {
      const mpopt::step_result h = lockstep_step(t, i, -1);
      CHECK(h.clip_coef < 1.0);
    }
  }
  SUBCASE("fp16 with dynamic scaling, clipping, DeepSpeed scale order (growth every 2 steps)") {
    o.deepspeed_scale_order = true;
    mpopt::dynamic_scale_args s;
    s.init_scale = 1024.f;
    s.scale_window = 2;
    twin<mpopt::adamw, fp16_mixed, mpopt::dynamic_scaler> t(two_groups<mpopt::adamw>(a), s, o);
    for (int i = 0; i < 8; ++i) lockstep_step(t, i, -1);
  }
  SUBCASE("set_options turns clipping off and on between steps") {
    twin<mpopt::adamw, bf16_mixed> t(two_groups<mpopt::adamw>(a), {}, o);
    lockstep_step(t, 0, -1);
    mpopt::step_options off;
    t.host->set_options(off);
    t.dev->set_options(off, t.stream);
    CHECK(lockstep_step(t, 1, -1).clip_coef == 1.0);
    t.host->set_options(o);
    t.dev->set_options(o, t.stream);
    CHECK(lockstep_step(t, 2, -1).clip_coef < 1.0);
  }
}

TEST_CASE("no overflow check and no clipping: no statistics, grad_norm is NaN, the step applies") {
  mpopt::no_scaler::args s;
  s.check_overflow = false;
  twin<mpopt::sgd, fp32> t(two_groups<mpopt::sgd>(mpopt::sgd::args{}), s);
  const mpopt::step_result h = lockstep_step(t, 0, -1);
  CHECK(h.applied);
  CHECK(std::isnan(t.dev->result(t.stream).grad_norm));
}

TEST_CASE("three hundred groups in one launch, with an lr schedule written on the stream") {
  rng sizes(7);
  std::vector<group_spec<mpopt::adamw>> groups(300);
  for (std::size_t g = 0; g < groups.size(); ++g) {
    groups[g].size = std::size_t(sizes.next() % 2000);
    groups[g].offset = std::size_t(sizes.next() % 3);
    groups[g].hparams.lr = 1e-3 * double(1 + g % 5);
  }
  twin<mpopt::adamw, bf16_mixed> t(groups);
  for (int i = 0; i < 6; ++i) {
    if (i == 3) {
      for (std::size_t g = 0; g < groups.size(); g += 7) {
        mpopt::adamw::args a = t.host->hparams(g);
        a.lr *= 0.5;
        t.host->set_hparams(g, a);
        t.dev->set_hparams(g, a, t.stream);
      }
    }
    lockstep_step(t, i, -1);
  }
  CHECK(t.dev->hparams(7).lr == t.host->hparams(7).lr);
}

TEST_CASE_TEMPLATE("lamb: per-tensor trust ratios on the device match the host", Prec, fp32, bf16_mixed, bf16_pure) {
  mpopt::lamb::args a;
  a.lr = 1e-2;
  a.weight_decay = 0.01;
  std::vector<group_spec<mpopt::lamb>> groups(3);
  groups[0].size = 100 + 3 + 1000 + 0 + 2600;
  groups[0].tensor_sizes = {100, 3, 1000, 0, 2600};  // tensors at unaligned offsets take the scalar path
  groups[0].hparams = a;
  groups[1].size = 777;  // no split: one tensor
  groups[1].offset = 1;
  groups[1].hparams = a;
  groups[2].size = 64;
  groups[2].tensor_sizes = {32, 32};
  groups[2].hparams = a;
  groups[2].hparams.max_coeff = 0.5;  // clamped ratios
  twin<mpopt::lamb, Prec> t(groups);
  for (int i = 0; i < 10; ++i) lockstep_step(t, i, -1);
}

TEST_CASE("the gradient norm is reproducible bit for bit") {
  mpopt::adamw::args a;
  twin<mpopt::adamw, bf16_mixed> t(two_groups<mpopt::adamw>(a));
  t.new_grads(1.f);
  t.dev->step(t.stream);
  const double first = t.dev->result(t.stream).grad_norm;
  t.dev->step(t.stream);  // the same gradients again
  const double second = t.dev->result(t.stream).grad_norm;
  CHECK(same_bytes(first, second));
}

TEST_CASE("invalid groups, hyper-parameters and pointers are rejected with the host's messages") {
  using prec = bf16_mixed;
  using host_opt = mpopt::optimizer<mpopt::adamw, prec>;
  using dev_opt = mpopt::cuda::optimizer<mpopt::adamw, prec>;
  const std::size_t n = 64;
  std::vector<bf16_t> h_params(n, bf16_t(1.f)), h_grads(n, bf16_t(0.f));
  device_buffer<bf16_t> d_params = to_device(h_params), d_grads = to_device(h_grads);
  auto groups = [&](bool device) {
    mpopt::param_group<mpopt::adamw, prec> g;
    g.params = device ? d_params.get() : h_params.data();
    g.grads = device ? d_grads.get() : h_grads.data();
    g.size = n;
    return std::vector<mpopt::param_group<mpopt::adamw, prec>>{g};
  };
  auto same_message = [&](auto&& edit) {
    auto h = groups(false);
    auto d = groups(true);
    edit(h[0]);
    edit(d[0]);
    const std::string host_msg = error_of([&] { host_opt o(h); });
    const std::string dev_msg = error_of([&] { dev_opt o(d); });
    CHECK(host_msg != "no error");
    CHECK(dev_msg == host_msg);
  };
  same_message([](auto& g) { g.params = nullptr; });
  same_message([](auto& g) { g.grads = nullptr; });
  same_message([](auto& g) { g.tensor_sizes = {10, 20}; });
  same_message([](auto& g) { g.hparams.lr = -1; });
  same_message([](auto& g) { g.hparams.beta2 = 1.0; });

  {  // scaler arguments and options: the host's messages too
    mpopt::step_options bad;
    bad.max_grad_norm = NAN;
    const std::string host_msg = error_of([&] { host_opt o(groups(false), {}, bad); });
    CHECK(error_of([&] { dev_opt o(groups(true), {}, bad); }) == host_msg);
    mpopt::dynamic_scale_args s;
    s.backoff_factor = 2.f;
    using host_fp16 = mpopt::optimizer<mpopt::adamw, prec, mpopt::dynamic_scaler>;
    using dev_fp16 = mpopt::cuda::optimizer<mpopt::adamw, prec, mpopt::dynamic_scaler>;
    const std::string host_scaler = error_of([&] { host_fp16 o(groups(false), s); });
    CHECK(host_scaler != "no error");
    CHECK(error_of([&] { dev_fp16 o(groups(true), s); }) == host_scaler);
  }

  // Device-only checks: the message names the group, the pointer and what is wrong.
  auto misaligned_params = groups(true);
  misaligned_params[0].params = reinterpret_cast<bf16_t*>(reinterpret_cast<char*>(d_params.get()) + 1);
  misaligned_params[0].size = n - 1;
  const std::string m1 = error_of([&] { dev_opt o(misaligned_params); });
  CHECK(m1.find("group 0: params 0x") == 0);
  CHECK(m1.find("is not aligned to its element size (2 bytes, bf16)") != std::string::npos);

  auto misaligned_grads = groups(true);
  misaligned_grads[0].grads = reinterpret_cast<const bf16_t*>(reinterpret_cast<const char*>(d_grads.get()) + 1);
  misaligned_grads[0].size = n - 1;
  const std::string m2 = error_of([&] { dev_opt o(misaligned_grads); });
  CHECK(m2.find("group 0: grads 0x") == 0);
  CHECK(m2.find("is not aligned to its element size") != std::string::npos);

  auto host_memory = groups(true);
  host_memory[0].params = h_params.data();
  const std::string m3 = error_of([&] { dev_opt o(host_memory); });
  CHECK(m3.find("group 0: params 0x") == 0);
  CHECK(m3.find("is host memory, not device memory") != std::string::npos);

  // Setters: validated before anything changes, with the host's messages.
  host_opt ho(groups(false));
  dev_opt dopt(groups(true));
  mpopt::adamw::args bad = ho.hparams(0);
  bad.eps = 0;
  CHECK(error_of([&] { dopt.set_hparams(0, bad, nullptr); }) == error_of([&] { ho.set_hparams(0, bad); }));
  mpopt::adamw::args more_states = ho.hparams(0);
  more_states.amsgrad = true;
  CHECK(error_of([&] { dopt.set_hparams(0, more_states, nullptr); }) ==
        error_of([&] { ho.set_hparams(0, more_states); }));
  CHECK(dopt.hparams(0).eps == ho.hparams(0).eps);
  CHECK(error_of([&] { dopt.state(0, 2); }) == error_of([&] { ho.state(0, 2); }));
  CHECK(error_of([&] { dopt.master(1); }).find("group index 1 out of range") == 0);
  CHECK(error_of([&] { dopt.compensation(1); }).find("group index 1 out of range") == 0);
  CHECK(dopt.compensation(0) == nullptr);  // only a kahan_summation master keeps one (tests/cuda/test_cuda_rounding.cu)
}

// ---------------------------------------------------------------------------------------------------------------------
// CUDA graph: the same 50 steps, uncaptured and replayed from one captured step.

namespace {

// Gradients for iteration *iter, times the loss scale the optimizer asks for (read on the device); an inf in every
// seventh iteration, and natural fp16 overflows once the scale has grown past what the values allow.
__global__ void make_grads(half_t* g, std::uint64_t n, const int* iter, const float* loss_scale) {
  const int it = *iter;
  const float scale = *loss_scale;
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ std::uint32_t(it + 1) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    float v = (float(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * 1e-2f * scale;
    if (it % 7 == 3 && i == 17) v = INFINITY;
    g[i] = half_t(v);
  }
}

__global__ void advance(int* iter) {
  *iter += 1;
}

}  // namespace

TEST_CASE("a whole step captured in a CUDA graph replays exactly as uncaptured steps, overflows included") {
  using prec = fp16_mixed;
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, prec, mpopt::dynamic_scaler>;
  const std::size_t n = 100003;
  const int steps = 50;
  mpopt::dynamic_scale_args s;
  s.scale_window = 4;  // the scale grows and backs off within the run
  mpopt::step_options o;
  o.max_grad_norm = 1.0;
  mpopt::adamw::args a;
  a.lr = 1e-3;

  cudaStream_t stream;
  MPOPT_CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  rng gen(3);
  std::vector<half_t> init(n);
  for (auto& x : init) x = half_t(gen.uniform() - 0.5f);

  struct run {
    device_buffer<half_t> params, grads;
    device_buffer<int> iter;
    std::unique_ptr<opt_t> opt;
  };
  auto make_run = [&]() {
    run r{to_device(init), device_buffer<half_t>(n, "grads"), to_device(std::vector<int>{0}), nullptr};
    mpopt::param_group<mpopt::adamw, prec> g;
    g.params = r.params.get();
    g.grads = r.grads.get();
    g.size = n;
    g.hparams = a;
    r.opt = std::make_unique<opt_t>(std::vector<mpopt::param_group<mpopt::adamw, prec>>{g}, s, o, stream);
    return r;
  };
  auto enqueue_step = [&](run& r) {
    make_grads<<<64, 256, 0, stream>>>(r.grads.get(), n, r.iter.get(), r.opt->device_loss_scale());
    r.opt->step(stream);
    advance<<<1, 1, 0, stream>>>(r.iter.get());
  };

  run plain = make_run();
  for (int i = 0; i < steps; ++i) enqueue_step(plain);
  REQUIRE(plain.opt->last_error().ok());
  const mpopt::step_result plain_last = plain.opt->result(stream);

  run replayed = make_run();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  // Global mode: any synchronising or otherwise capture-unsafe call inside step() fails the capture.
  MPOPT_CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  enqueue_step(replayed);
  MPOPT_CUDA_REQUIRE(cudaStreamEndCapture(stream, &graph));
  REQUIRE(replayed.opt->last_error().ok());
  MPOPT_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < steps; ++i) MPOPT_CUDA_REQUIRE(cudaGraphLaunch(exec, stream));
  const mpopt::step_result replayed_last = replayed.opt->result(stream);

  CHECK(same_bits(to_host(plain.params.get(), n), to_host(replayed.params.get(), n)));
  CHECK(same_bits(to_host(plain.opt->master(0), n), to_host(replayed.opt->master(0), n)));
  for (int j = 0; j < 2; ++j)
    CHECK(same_bits(to_host(plain.opt->state(0, j), n), to_host(replayed.opt->state(0, j), n)));
  CHECK(same_bytes(plain.opt->scaler_state(stream), replayed.opt->scaler_state(stream)));
  auto core_of = [](const opt_t& opt) {
    mpopt::cuda::step_core c;
    MPOPT_CUDA_REQUIRE(cudaMemcpy(&c, opt.device_scalars(), sizeof c, cudaMemcpyDeviceToHost));
    return c;
  };
  CHECK(same_bytes(core_of(*plain.opt), core_of(*replayed.opt)));  // every field of the latest step, bit for bit
  CHECK(plain_last.step == replayed_last.step);
  CHECK(plain_last.next_loss_scale == replayed_last.next_loss_scale);
  CHECK(same_bytes(plain_last.grad_norm, replayed_last.grad_norm));
  // The run did skip (planted and natural overflows) and did apply.
  CHECK(plain_last.step > steps / 2);
  CHECK(plain_last.step < steps);
  const auto scaler = plain.opt->scaler_state(stream);
  CHECK(scaler.last_overflow_iter >= 0);

  MPOPT_CUDA_REQUIRE(cudaGraphExecDestroy(exec));
  MPOPT_CUDA_REQUIRE(cudaGraphDestroy(graph));
  plain.opt.reset();
  replayed.opt.reset();
  MPOPT_CUDA_REQUIRE(cudaStreamDestroy(stream));
}

namespace {

// Four micro-batches of G accumulated into Accum on the device and on the host: the same bits, aligned (vector
// path) and misaligned by one element (scalar path), over a length that leaves a tail.
template <class Accum, class G>
void check_accumulation(std::size_t offset) {
  const std::size_t n = 100003;
  std::vector<Accum> host(n);
  std::vector<std::vector<G>> micro(4, std::vector<G>(n + offset));
  for (std::size_t k = 0; k < micro.size(); ++k)
    for (std::size_t i = 0; i < n + offset; ++i)
      micro[k][i] = mpopt::convert<G>(
          float(std::ldexp(double((i * 2654435761u + k * 40503u) % 2001) - 1000.0, -int((i + k) % 24))));
  device_buffer<Accum> acc(n + offset, "accumulator");
  for (std::size_t k = 0; k < micro.size(); ++k) {
    const device_buffer<G> d = to_device(micro[k]);
    if (k == 0) {
      mpopt::assign_grads(host.data(), micro[k].data() + offset, n);
      MPOPT_CUDA_REQUIRE(mpopt::cuda::assign_grads(acc.get() + offset, d.get() + offset, n));
    } else {
      mpopt::accumulate_grads(host.data(), micro[k].data() + offset, n);
      MPOPT_CUDA_REQUIRE(mpopt::cuda::accumulate_grads(acc.get() + offset, d.get() + offset, n));
    }
    MPOPT_CUDA_REQUIRE(cudaDeviceSynchronize());
  }
  CHECK(same_bits(to_host(acc.get() + offset, n), host));
}

}  // namespace

TEST_CASE("gradient accumulation on the device gives the host's bits") {
  for (std::size_t offset : {std::size_t(0), std::size_t(1)}) {
    CAPTURE(offset);
    check_accumulation<float, mpopt::bf16_t>(offset);
    check_accumulation<mpopt::bf16_t, mpopt::bf16_t>(offset);
    check_accumulation<float, half_t>(offset);
    check_accumulation<half_t, float>(offset);
  }
  MPOPT_CUDA_REQUIRE(
      mpopt::cuda::accumulate_grads(static_cast<float*>(nullptr), static_cast<const float*>(nullptr), 0));
  // A null pointer with elements is refused before any launch (a fault would end the context).
  mpopt::cuda::device_buffer<float> acc(4, "acc");
  CHECK(mpopt::cuda::accumulate_grads(acc.get(), static_cast<const float*>(nullptr), 4) == cudaErrorInvalidValue);
  CHECK(mpopt::cuda::assign_grads(static_cast<float*>(nullptr), acc.get(), 4) == cudaErrorInvalidValue);
}
