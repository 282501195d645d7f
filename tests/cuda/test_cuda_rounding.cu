// A bf16 master with stochastic rounding or Kahan summation on mpopt::cuda::optimizer: master, params, states and
// compensation equal the host optimizer's bit for bit over many steps, with several groups, odd sizes and misaligned
// buffers (the scalar path), at an lr so small that nearest rounding keeps none of the updates; a captured CUDA graph
// replays as uncaptured steps (the step counter and seed are read on the device); a checkpoint resumes bitwise. LAMB,
// whose master is stored by its second phase, too.
//
// Bit for bit needs the device to round every operation as the host does: tests/CMakeLists.txt compiles this file
// with --fmad=false (the host side has -ffp-contract=off), and each comparison first checks that it was.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bitwise_support.cuh"
#include "mpopt/checkpoint/cuda.cuh"

using namespace mpopt_test;

namespace {

using mpopt::kahan_summation;
using mpopt::stochastic_rounding;
using stochastic_fp32_states = bf16_master_fp32_states<stochastic_rounding>;
using kahan_fp32_states = bf16_master_fp32_states<kahan_summation>;

// Group layouts: a vector path with tails and two tensors; a misaligned one (scalar path) with amsgrad (a second
// kernel, 3 states); a single element; an aligned one at an offset. Small lrs: an Adam update of about lr is far below
// half a bf16 ulp of most weights.
std::vector<group_spec<mpopt::adamw>> rounding_groups() {
  std::vector<group_spec<mpopt::adamw>> g(4);
  g[0].size = 4099;
  g[0].tensor_sizes = {1000, 3099};
  g[0].hparams.lr = 1e-4;
  g[1].size = 777;
  g[1].offset = 3;
  g[1].hparams.lr = 3e-5;
  g[1].hparams.amsgrad = true;
  g[2].size = 1;
  g[2].offset = 1;
  g[2].hparams.lr = 1e-4;
  g[3].size = 2053;
  g[3].offset = 8;
  g[3].hparams.lr = 2e-4;
  g[3].hparams.weight_decay = 0.1;
  return g;
}

// Every buffer of every group, device against host, bit for bit.
template <class Twin, class Prec>
void check_same_as_host(Twin& t, int step) {
  for (std::size_t g = 0; g < t.specs.size(); ++g) {
    const std::size_t n = t.specs[g].size;
    INFO("step ", step, ", group ", g);
    CHECK_SAME_BITS(to_host(t.dparam(g), n), t.h_params[g], "params");
    CHECK_SAME_BITS(to_host(t.dev->master(g), n), t.host_master(g), "master");
    for (int j = 0; j < t.host->num_states(g); ++j)
      CHECK_SAME_BITS(to_host(t.dev->state(g, j), n), t.host_state(g, j), "state " + std::to_string(j));
    if constexpr (is_kahan_v<Prec>) {
      const auto* c = t.host->compensation(g);
      CHECK_SAME_BITS(to_host(t.dev->compensation(g), n), (std::vector<bf16_t>(c, c + n)), "compensation");
    } else {
      CHECK(t.dev->compensation(g) == nullptr);
    }
  }
}

// New grads of a steady sign per element and varying size, so that Adam's updates (about lr each) add up.
template <class Twin>
void steady_grads(Twin& t) {
  for (std::size_t g = 0; g < t.specs.size(); ++g) {
    for (std::size_t i = 0; i < t.specs[g].size; ++i)
      t.h_grads[g][i] = bf16_t((i % 2 == 0 ? 1.f : -1.f) * (1e-3f + 1e-2f * t.gen.uniform()));
    copy_to(t.dgrad(g), t.h_grads[g].data(), t.specs[g].size);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("a stochastically rounded or Kahan bf16 master on the device: the host optimizer's bits", Prec,
                   stochastic_fp32_states, kahan_fp32_states, mpopt::bf16_stochastic_policy, mpopt::bf16_kahan_policy) {
  require_ieee_device_arithmetic();
  using nearest = mpopt::precision<mpopt::param<bf16_t>, mpopt::master<bf16_t>, mpopt::grad<bf16_t>,
                                   mpopt::state<typename Prec::state_t>>;
  constexpr bool stochastic = std::is_same_v<typename Prec::master_rounding, stochastic_rounding>;
  mpopt::step_options o;
  o.rounding_seed = 0x1234abcd5678ull;
  twin<mpopt::adamw, Prec> t(rounding_groups(), {}, o, 7);

  // The same steps with nearest rounding, on the host: the reference that loses the small updates.
  std::vector<std::vector<bf16_t>> nearest_params = t.h_params;
  std::vector<mpopt::param_group<mpopt::adamw, nearest>> ng;
  for (std::size_t g = 0; g < t.specs.size(); ++g)
    ng.push_back(
        {nearest_params[g].data(), t.h_grads[g].data(), t.specs[g].size, t.specs[g].tensor_sizes, t.specs[g].hparams});
  mpopt::optimizer<mpopt::adamw, nearest> nearest_opt(ng, {}, o);
  const std::vector<std::vector<bf16_t>> initial = t.h_params;

  const int steps = 24;
  for (int s = 0; s < steps; ++s) {
    if (stochastic && s == steps / 2) {  // a new seed takes effect at the next step, on both backends
      o.rounding_seed = 99;
      t.host->set_options(o);
      t.dev->set_options(o, t.stream);
    }
    steady_grads(t);
    const mpopt::step_result r = t.step(s);
    REQUIRE(r.applied);
    nearest_opt.step();
    check_same_as_host<decltype(t), Prec>(t, s);
  }
  CHECK(t.dev->step_count(t.stream) == steps);

  // The test means something: weights of magnitude >= 1/4 never moved under nearest rounding, and the rounding
  // option moved many of them.
  std::size_t large = 0, moved = 0, moved_nearest = 0;
  for (std::size_t g = 0; g < t.specs.size(); ++g) {
    for (std::size_t i = 0; i < t.specs[g].size; ++i) {
      if (std::fabs(float(initial[g][i])) < 0.25f) continue;
      ++large;
      moved += t.h_params[g][i].bits != initial[g][i].bits ? 1 : 0;
      moved_nearest += nearest_params[g][i].bits != initial[g][i].bits ? 1 : 0;
    }
  }
  CHECK(large > 4000);
  CHECK(moved_nearest == 0);
  CHECK(moved > large / 4);
}

// LAMB stores its master in the second phase, through the same rounding, with per-tensor entries (first_index: the
// tensor's offset in its group). Its trust ratios come from double sums that the device adds in another order; they
// round to the same float ratio unless a sum lies within a few double ulps of a float rounding boundary (about 1e-8
// per tensor and step), so the masters are compared bit for bit too.
TEST_CASE_TEMPLATE("lamb with a rounding master: the host optimizer's bits", Prec, mpopt::bf16_kahan_policy,
                   mpopt::bf16_stochastic_policy) {
  require_ieee_device_arithmetic();
  mpopt::lamb::args a;
  a.lr = 1e-3;
  a.weight_decay = 0.01;
  std::vector<group_spec<mpopt::lamb>> groups(2);
  groups[0].size = 100 + 3 + 1000 + 2600;
  groups[0].tensor_sizes = {100, 3, 1000, 2600};  // tensors at unaligned offsets take the scalar path
  groups[0].hparams = a;
  groups[1].size = 777;
  groups[1].offset = 1;
  groups[1].hparams = a;
  twin<mpopt::lamb, Prec> t(groups, {}, {}, 3);
  for (int s = 0; s < 12; ++s) {
    steady_grads(t);
    t.step(s);
    check_same_as_host<decltype(t), Prec>(t, s);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// CUDA graph: one captured step replayed against uncaptured steps. The stochastic counter's step and the seed come
// from device memory at each replay; a seed set on the stream between replays is picked up.

namespace {

// Grads for iteration *iter of group `salt`, computed on the device so that a replay needs no host input.
__global__ void make_grads(bf16_t* g, std::uint64_t n, std::uint32_t salt, const int* iter) {
  const int it = *iter;
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ std::uint32_t(it + 1) * 40503u ^ salt * 97u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    g[i] = bf16_t((float(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * 1e-2f);
  }
}

__global__ void advance(int* iter) {
  *iter += 1;
}

template <class Prec>
struct graph_run {
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, Prec>;
  std::vector<std::size_t> sizes = {4099, 777, 1};
  std::vector<device_buffer<bf16_t>> params, grads;
  device_buffer<int> iter = to_device(std::vector<int>{0});
  std::unique_ptr<opt_t> opt;

  graph_run(const mpopt::step_options& o, cudaStream_t stream) {
    rng gen(11);
    std::vector<mpopt::param_group<mpopt::adamw, Prec>> groups;
    for (std::size_t g = 0; g < sizes.size(); ++g) {
      std::vector<bf16_t> p(sizes[g] + 1);  // from element 1: misaligned, the scalar path
      for (auto& x : p) x = bf16_t(gen.uniform() * 2.f - 1.f);
      params.push_back(to_device(p));
      grads.emplace_back(sizes[g] + 1, "grads");
      mpopt::param_group<mpopt::adamw, Prec> spec;
      spec.params = params.back().get() + (g == 1 ? 1 : 0);
      spec.grads = grads.back().get() + (g == 1 ? 1 : 0);
      spec.size = sizes[g];
      spec.hparams.lr = 1e-4;
      groups.push_back(spec);
    }
    opt = std::make_unique<opt_t>(groups, mpopt::no_scaler::args{}, o, stream);
  }

  void enqueue_step(cudaStream_t stream) {
    for (std::size_t g = 0; g < sizes.size(); ++g)
      make_grads<<<16, 256, 0, stream>>>(grads[g].get() + (g == 1 ? 1 : 0), sizes[g], std::uint32_t(g), iter.get());
    opt->step(stream);
    advance<<<1, 1, 0, stream>>>(iter.get());
  }

  std::vector<std::vector<unsigned char>> snapshot() const {
    std::vector<std::vector<unsigned char>> out;
    auto grab = [&out](const void* p, std::size_t bytes) {
      std::vector<unsigned char> v(bytes);
      if (bytes > 0) MPOPT_CUDA_REQUIRE(cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost));
      out.push_back(std::move(v));
    };
    for (std::size_t g = 0; g < sizes.size(); ++g) {
      grab(opt->params(g), sizes[g] * sizeof(bf16_t));
      grab(opt->master(g), sizes[g] * sizeof(bf16_t));
      for (int j = 0; j < opt->num_states(g); ++j) grab(opt->state(g, j), sizes[g] * sizeof(typename Prec::state_t));
      if (opt->compensation(g) != nullptr) grab(opt->compensation(g), sizes[g] * sizeof(bf16_t));
    }
    return out;
  }
};

}  // namespace

TEST_CASE_TEMPLATE("a captured step with a rounding master replays exactly as uncaptured steps", Prec,
                   stochastic_fp32_states, mpopt::bf16_kahan_policy) {
  const int steps = 24;
  mpopt::step_options o;
  mpopt::step_options reseeded = o;
  reseeded.rounding_seed = 4242;
  cudaStream_t stream;
  MPOPT_CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    graph_run<Prec> plain(o, stream);
    const auto initial = plain.snapshot();
    for (int i = 0; i < steps; ++i) {
      if (i == steps / 2) plain.opt->set_options(reseeded, stream);
      plain.enqueue_step(stream);
    }
    REQUIRE(plain.opt->last_error().ok());
    const mpopt::step_result plain_last = plain.opt->result(stream);

    graph_run<Prec> replayed(o, stream);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    MPOPT_CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    replayed.enqueue_step(stream);
    MPOPT_CUDA_REQUIRE(cudaStreamEndCapture(stream, &graph));
    REQUIRE(replayed.opt->last_error().ok());
    MPOPT_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < steps; ++i) {
      if (i == steps / 2) replayed.opt->set_options(reseeded, stream);
      MPOPT_CUDA_REQUIRE(cudaGraphLaunch(exec, stream));
    }
    const mpopt::step_result replayed_last = replayed.opt->result(stream);

    CHECK(plain_last.step == steps);
    CHECK(replayed_last.step == steps);
    const auto a = plain.snapshot(), b = replayed.snapshot();
    REQUIRE(a.size() == b.size());
    for (std::size_t k = 0; k < a.size(); ++k) {
      CAPTURE(k);
      CHECK(a[k] == b[k]);
    }
    CHECK(a[0] != initial[0]);  // group 0's params moved
    MPOPT_CUDA_REQUIRE(cudaGraphExecDestroy(exec));
    MPOPT_CUDA_REQUIRE(cudaGraphDestroy(graph));
  }
  MPOPT_CUDA_REQUIRE(cudaStreamDestroy(stream));
}

// ---------------------------------------------------------------------------------------------------------------------
// Checkpoints: the compensation (Kahan) and the seed (stochastic: in the metadata; the resumed optimizer is built
// with it) carry the rounding's state.

TEST_CASE_TEMPLATE("a rounding master's CUDA checkpoint resumes bit for bit", Prec, mpopt::bf16_kahan_policy,
                   kahan_fp32_states, stochastic_fp32_states) {
  const auto dir = (std::filesystem::temp_directory_path() / "mpopt_cuda_ckpt_rounding").string();
  std::filesystem::remove_all(dir);
  mpopt::step_options o;
  o.rounding_seed = 777;
  const int before = 8, after = 8;

  twin<mpopt::adamw, Prec> a(rounding_groups(), {}, o, 5);  // its host optimizer is the second reference
  for (int s = 0; s < before; ++s) {
    a.new_grads(1.0f);
    a.dev->step(a.stream);
    a.host->step();
  }
  mpopt::checkpoint::save(*a.dev, dir, {}, a.stream);
  if constexpr (is_kahan_v<Prec>) {
    std::size_t nonzero = 0;  // the compensation carries state: most weights dropped part of their updates
    const auto c = to_host(a.dev->compensation(0), a.specs[0].size);
    for (const bf16_t x : c) nonzero += x.bits != 0 ? 1 : 0;
    CHECK(nonzero > c.size() / 2);
  }
  std::vector<std::vector<bf16_t>> grads_after;
  for (int s = 0; s < after; ++s) {
    a.new_grads(1.0f);
    for (std::size_t g = 0; g < a.specs.size(); ++g) grads_after.push_back(a.h_grads[g]);
    a.dev->step(a.stream);
  }

  twin<mpopt::adamw, Prec> b(rounding_groups(), {}, o, 6);  // other initial params: all of them come from the file
  mpopt::checkpoint::load(*b.dev, dir, {}, b.stream);
  CHECK(b.dev->step_count(b.stream) == before);
  for (int s = 0; s < after; ++s) {
    for (std::size_t g = 0; g < b.specs.size(); ++g) {
      const auto& v = grads_after[std::size_t(s) * b.specs.size() + g];
      copy_to(b.dgrad(g), v.data(), v.size());
    }
    b.dev->step(b.stream);
  }
  REQUIRE(b.dev->last_error().ok());
  CHECK(b.dev->step_count(b.stream) == before + after);
  for (std::size_t g = 0; g < a.specs.size(); ++g) {
    const std::size_t n = a.specs[g].size;
    INFO("group ", g);
    CHECK_SAME_BITS(to_host(b.dparam(g), n), to_host(a.dparam(g), n), "params");
    CHECK_SAME_BITS(to_host(b.dev->master(g), n), to_host(a.dev->master(g), n), "master");
    for (int j = 0; j < a.dev->num_states(g); ++j)
      CHECK_SAME_BITS(to_host(b.dev->state(g, j), n), to_host(a.dev->state(g, j), n), "state " + std::to_string(j));
    if constexpr (is_kahan_v<Prec>)
      CHECK_SAME_BITS(to_host(b.dev->compensation(g), n), to_host(a.dev->compensation(g), n), "compensation");
  }

  // The host optimizer loads the same files: the state the device saved is the host's at step `before` (with IEEE
  // device arithmetic, see the top of the file).
  if (!device_contracts()) {
    twin<mpopt::adamw, Prec> c(rounding_groups(), {}, o, 9);
    mpopt::checkpoint::load(*c.host, dir);
    for (std::size_t g = 0; g < a.specs.size(); ++g) {
      INFO("group ", g);
      CHECK_SAME_BITS(c.host_master(g), a.host_master(g), "master");
      if constexpr (is_kahan_v<Prec>) {
        const std::size_t n = a.specs[g].size;
        CHECK_SAME_BITS(std::vector<bf16_t>(c.host->compensation(g), c.host->compensation(g) + n),
                        std::vector<bf16_t>(a.host->compensation(g), a.host->compensation(g) + n), "compensation");
      }
    }
  }
  std::filesystem::remove_all(dir);
}
