// ZeRO stages 0-3 over MPI at the world size mpirun gives (ctest runs 1, 2, 3 and 4): every stage must reproduce
// the single-rank optimizer's trajectory bit for bit (master weights, states, params, grad norm, loss scale), for
// every rule and for fp32, mixed and pure-16-bit policies. Why bit for bit is the right bar: the grad mean travels
// in a type wide enough that the sum over ranks is exact (fp64 for fp32 grads, fp32 for 16-bit ones), and the
// norm and LAMB partial sums are taken per 4096-element block on a grid every shard starts on, then added in
// block order on every rank (zero/partition.hpp). The exception is fp64 grads, reduced in fp64: at world sizes
// that are not powers of two the mean of equal grads can be off by an ulp, and the bound is stated below. The
// reference runs on each rank with no communicator.
#include <mpopt/comm/mpi.hpp>
#include <mpopt/mpopt.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "mpi_test.hpp"

namespace {

using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

// A deterministic value in [-1, 1) from a few integers (splitmix64).
double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return double(x >> 11) / double(1ull << 52) - 1.0;
}

// Two groups: one whose tensors straddle shard boundaries (with a zero-sized tensor among them), one plain.
struct layout {
  std::vector<std::vector<std::size_t>> tensors = {{3000, 0, 7000, 11, 19989, 1}, {9000}};
  std::size_t size(std::size_t g) const {
    std::size_t n = 0;
    for (std::size_t s : tensors[g]) n += s;
    return n;
  }
};

constexpr int kSteps = 5;
constexpr int kOverflowStep = 2;  // a NaN in one element, on the last rank only: every rank must skip

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// fp64 grads are reduced in fp64, where the mean of W equal values is exact only for W a power of two (3g rounds);
// there the bound is 1e-13 of the element's magnitude (plus an absolute 1e-13 for elements near zero).
bool exact_reduction(bool fp64) {
  const int w = world_size();
  return !fp64 || (w & (w - 1)) == 0;
}

template <class T>
bool matches(const std::vector<T>& a, const std::vector<T>& b, bool exact) {
  if (exact || !std::is_same_v<T, double>) return same_bits(a, b);
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = mpopt::convert<double>(a[i]), y = mpopt::convert<double>(b[i]);
    if (!(std::fabs(x - y) <= 1e-13 * (std::fabs(y) + 1.0))) return false;
  }
  return true;
}

template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
struct run_setup {
  typename Rule::args hparams;
  typename Scaler::args scaler{};
  double max_grad_norm = 0.5;  // small enough that clipping is active on most steps
  double grad_magnitude = 1.0;
  bool per_tensor_reduce = false;  // stages 2-3: reduce_grads() tensor by tensor instead of param_group::grads
  bool alternate = false;          // with per_tensor_reduce: param_group::grads on even steps, reduce_grads() on odd
};

template <class Rule, class Prec, class Scaler>
void check_equivalence(const run_setup<Rule, Prec, Scaler>& setup, int stage, const std::string& what) {
  using opt_t = mpopt::optimizer<Rule, Prec, Scaler>;
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  using master_t = typename Prec::master_t;
  using state_t = typename Prec::state_t;
  CAPTURE(what);
  CAPTURE(stage);
  const std::string tag = rank_tag();
  CAPTURE(tag);
  const layout lay;
  const std::size_t groups = lay.tensors.size();
  const int W = world_size();
  const bool exact = exact_reduction(std::is_same_v<grad_t, double>);

  // Same initial params on every rank; grads: the same global grad on every rank (so the mean is that grad), but
  // the overflow step's NaN only on the last rank.
  std::vector<std::vector<param_t>> ref_params(groups), params(groups);
  std::vector<std::vector<grad_t>> ref_grads(groups), grads(groups);
  std::vector<mpopt::param_group<Rule, Prec>> ref_specs, specs;
  for (std::size_t g = 0; g < groups; ++g) {
    const std::size_t n = lay.size(g);
    ref_params[g].resize(n);
    for (std::size_t i = 0; i < n; ++i) ref_params[g][i] = mpopt::convert<param_t>(noise(g, i, 7));
    params[g] = ref_params[g];
    ref_grads[g].resize(n);
    grads[g].resize(n);
    mpopt::param_group<Rule, Prec> spec;
    spec.size = n;
    spec.tensor_sizes = lay.tensors[g];
    spec.hparams = setup.hparams;
    spec.params = ref_params[g].data();
    spec.grads = ref_grads[g].data();
    ref_specs.push_back(spec);
    spec.params = params[g].data();
    spec.grads = setup.per_tensor_reduce && !setup.alternate && stage >= 2 ? nullptr : grads[g].data();
    specs.push_back(spec);
  }
  mpopt::step_options opts;
  opts.max_grad_norm = setup.max_grad_norm;
  opt_t ref(ref_specs, setup.scaler, opts);
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = stage;
  z.bucket_elements = 5000;  // several buckets per group, not aligned to shards or tensors
  opt_t opt(specs, comm, z, setup.scaler, opts);

  for (int step = 0; step < kSteps; ++step) {
    CAPTURE(step);
    for (std::size_t g = 0; g < groups; ++g) {
      for (std::size_t i = 0; i < lay.size(g); ++i) {
        const grad_t v = mpopt::convert<grad_t>(setup.grad_magnitude * noise(100 + step, g, i));
        ref_grads[g][i] = v;
        grads[g][i] = v;
      }
      if (step == kOverflowStep && g == 0) {
        const grad_t nan = mpopt::convert<grad_t>(std::numeric_limits<double>::quiet_NaN());
        ref_grads[0][12345] = nan;
        if (world_rank() == W - 1) grads[0][12345] = nan;
      }
    }
    if (stage == 3) {  // what a forward pass does: gather each tensor's params, use them, release
      for (std::size_t g = 0; g < groups; ++g) {
        std::size_t offset = 0;
        for (std::size_t t = 0; t < lay.tensors[g].size(); ++t) {
          // Odd steps prefetch as a framework would: the next tensor is gathered before this one is used.
          if (step % 2 == 1 && t + 1 < lay.tensors[g].size()) CHECK(opt.prefetch(g, t + 1, t + 2));
          const param_t* p = opt.gather(g, t, t + 1);
          const std::size_t n = lay.tensors[g][t];
          const auto want = ref_params[g].begin() + std::ptrdiff_t(offset);
          CHECK(matches(std::vector<param_t>(p, p + n), std::vector<param_t>(want, want + std::ptrdiff_t(n)), exact));
          opt.release(g, t, t + 1);
          offset += n;
        }
      }
      CHECK(opt.live_elements() == 0);
    }
    const bool reduce_now = setup.per_tensor_reduce && stage >= 2 && (!setup.alternate || step % 2 == 1);
    if (reduce_now) {  // as a backward pass would: tensor by tensor, last first
      for (std::size_t g = 0; g < groups; ++g) {
        std::size_t end = lay.size(g);
        for (std::size_t t = lay.tensors[g].size(); t-- > 0;) {
          end -= lay.tensors[g][t];
          opt.reduce_grads(g, t, t + 1, grads[g].data() + end);
        }
      }
    }
    const mpopt::step_result want = ref.step();
    const mpopt::step_result got = opt.step();
    REQUIRE(got.applied == want.applied);
    CHECK(got.applied == (step != kOverflowStep));
    CHECK(got.reason == want.reason);
    CHECK(got.step == want.step);
    CHECK(got.loss_scale == want.loss_scale);
    CHECK(got.next_loss_scale == want.next_loss_scale);
    if (got.applied && exact) {
      CHECK(got.grad_norm == want.grad_norm);
      CHECK(got.clip_coef == want.clip_coef);
    } else if (got.applied) {
      CHECK(got.grad_norm == doctest::Approx(want.grad_norm).epsilon(1e-13));
      CHECK(got.clip_coef == doctest::Approx(want.clip_coef).epsilon(1e-13));
    }
    for (std::size_t g = 0; g < groups; ++g) {
      CAPTURE(g);
      const std::size_t n = lay.size(g);
      std::vector<master_t> m(n), ref_m(ref.master(g), ref.master(g) + n);
      opt.gather_master(g, m.data());
      CHECK(matches(m, ref_m, exact));
      for (int j = 0; j < ref.num_states(g); ++j) {
        std::vector<state_t> s(n), ref_s(ref.state(g, j), ref.state(g, j) + n);
        opt.gather_state(g, j, s.data());
        CHECK(matches(s, ref_s, exact));
      }
      std::vector<param_t> p(n);
      opt.gather_params(g, p.data());
      CHECK(matches(p, ref_params[g], exact));
      if (stage < 3) CHECK(matches(params[g], ref_params[g], exact));  // the caller's own copy, all-gathered
    }
  }
}

template <class Rule, class Prec, class Scaler>
void check_all_stages(const run_setup<Rule, Prec, Scaler>& setup, const std::string& what) {
  for (int stage = 0; stage <= 3; ++stage) check_equivalence(setup, stage, what);
}

}  // namespace

TEST_CASE("ZeRO stages 0-3 reproduce the single-rank trajectory bit for bit: AdamW") {
  run_setup<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> fp32;
  fp32.hparams.lr = 1e-2;
  check_all_stages(fp32, "adamw fp32");
  fp32.per_tensor_reduce = true;
  check_all_stages(fp32, "adamw fp32, reduce_grads per tensor");

  run_setup<mpopt::adamw, mpopt::bf16_mixed_policy, mpopt::no_scaler> bf16;
  bf16.hparams.lr = 1e-2;
  check_all_stages(bf16, "adamw bf16 mixed");

  run_setup<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> fp16;
  fp16.hparams.lr = 1e-2;
  fp16.scaler.init_scale = 1024;
  fp16.grad_magnitude = 1024;  // grads as a scaled loss gives them
  fp16.per_tensor_reduce = true;
  check_all_stages(fp16, "adamw fp16 mixed, dynamic scaling");

  run_setup<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler> pure;
  pure.hparams.lr = 1e-2;
  check_all_stages(pure, "adamw bf16 pure");
}

TEST_CASE("ZeRO stages 2-3: param_group::grads and reduce_grads() in turn reproduce the single-rank trajectory") {
  // A step fed by param_group::grads must leave this rank's reduced shard zeroed: the next step's reduce_grads()
  // accumulates into it.
  run_setup<mpopt::adamw, mpopt::fp32_policy, mpopt::no_scaler> fp32;
  fp32.hparams.lr = 1e-2;
  fp32.per_tensor_reduce = true;
  fp32.alternate = true;
  for (int stage : {2, 3}) check_equivalence(fp32, stage, "adamw fp32, param_group::grads and reduce_grads in turn");
}

TEST_CASE("ZeRO stages 0-3 reproduce the single-rank trajectory bit for bit: the other rules") {
  run_setup<mpopt::adam, mpopt::fp32_policy> adam;
  adam.hparams.amsgrad = true;
  adam.hparams.weight_decay = 0.01;
  check_all_stages(adam, "adam amsgrad + l2 fp32");

  run_setup<mpopt::sgd, mpopt::bf16_mixed_policy> sgd;
  sgd.hparams.lr = 0.1;
  sgd.hparams.momentum = 0.9;
  sgd.hparams.nesterov = true;
  check_all_stages(sgd, "sgd nesterov bf16 mixed");

  run_setup<mpopt::adagrad, mpopt::fp32_policy> adagrad;
  check_all_stages(adagrad, "adagrad fp32");

  run_setup<mpopt::lion, mpopt::fp32_policy> lion;
  lion.hparams.lr = 1e-3;
  check_all_stages(lion, "lion fp32");

  run_setup<mpopt::lamb, mpopt::fp32_policy> lamb;  // per-tensor trust ratios over tensors split across ranks
  lamb.hparams.lr = 1e-2;
  check_all_stages(lamb, "lamb fp32");
  run_setup<mpopt::lamb, mpopt::bf16_mixed_policy> lamb16;
  lamb16.hparams.lr = 1e-2;
  lamb16.per_tensor_reduce = true;
  check_all_stages(lamb16, "lamb bf16 mixed");

  run_setup<mpopt::adamw, mpopt::fp64_policy> fp64;
  check_all_stages(fp64, "adamw fp64");
}

TEST_CASE("ZeRO: different grads per rank average to the mean") {
  // Rank r feeds grad_r; the reference feeds their mean, computed here in double (exact: the values are fp32 with
  // similar exponents, so the sum over <= 4 ranks needs no rounding) and rounded once to fp32, as the library does.
  const int W = world_size(), me = world_rank();
  const std::size_t n = 30000;
  for (int stage = 0; stage <= 3; ++stage) {
    CAPTURE(stage);
    std::vector<float> ref_p(n), p(n), ref_g(n), g(n);
    for (std::size_t i = 0; i < n; ++i) ref_p[i] = p[i] = float(noise(1, i, 2));
    mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> ref_spec{ref_p.data(), ref_g.data(), n, {}, {}};
    mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> spec{p.data(), g.data(), n, {}, {}};
    mpopt::step_options opts;
    opts.max_grad_norm = 1.0;
    mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> ref({ref_spec}, {}, opts);
    mpopt::comm::mpi comm;
    mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> opt({spec}, comm, {stage}, {}, opts);
    for (int step = 0; step < 3; ++step) {
      for (std::size_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int r = 0; r < W; ++r) sum += double(float(noise(step, r, i)));
        ref_g[i] = float(sum / W);
        g[i] = float(noise(step, std::uint64_t(me), i));
      }
      const auto want = ref.step();
      const auto got = opt.step();
      CHECK(got.grad_norm == want.grad_norm);
      std::vector<float> m(n), ref_m(ref.master(0), ref.master(0) + n);
      opt.gather_master(0, m.data());
      CHECK(same_bits(m, ref_m));
    }
  }
}

TEST_CASE("ZeRO: bf16 micro-batch grads accumulated in fp32 reproduce the single-rank run at every stage") {
  // data_types.grad_accum_dtype fp32 on a bf16 model: the policy's grad role is fp32. Stages 0-1 read an fp32
  // grad_accumulator; stages 2-3 take each micro-batch's bf16 grads through reduce_grads, accumulating the reduced
  // shard in fp32. Every rank feeds the same micro-batch grads, so the mean is the grad, and four bf16 grads of
  // similar size sum exactly in fp32 in any order: the trajectory must equal the single-rank one bit for bit.
  using bf16_fp32_accum =
      mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;
  const layout L;
  const std::size_t n = L.size(0);
  constexpr int micro_batches = 4;
  mpopt::step_options opts;
  opts.max_grad_norm = 0.5;
  for (int stage = 0; stage <= 3; ++stage) {
    CAPTURE(stage);
    std::vector<mpopt::bf16_t> ref_p(n), p(n), micro(n);
    for (std::size_t i = 0; i < n; ++i) ref_p[i] = p[i] = mpopt::bf16_t(float(noise(5, i, 6)));
    mpopt::grad_accumulator<float> ref_acc(n), acc(n);
    mpopt::param_group<mpopt::adamw, bf16_fp32_accum> ref_spec{ref_p.data(), ref_acc.data(), n, L.tensors[0], {}};
    mpopt::param_group<mpopt::adamw, bf16_fp32_accum> spec{
        p.data(), stage < 2 ? acc.data() : nullptr, n, L.tensors[0], {}};
    mpopt::optimizer<mpopt::adamw, bf16_fp32_accum> ref({ref_spec}, {}, opts);
    mpopt::comm::mpi comm;
    mpopt::optimizer<mpopt::adamw, bf16_fp32_accum> opt({spec}, comm, {stage}, {}, opts);
    const std::size_t tensors = L.tensors[0].size();
    for (int step = 0; step < 3; ++step) {
      ref_acc.reset();
      acc.reset();
      for (int k = 0; k < micro_batches; ++k) {
        for (std::size_t i = 0; i < n; ++i)
          micro[i] = mpopt::bf16_t(float(0.05 * noise(std::uint64_t(step), std::uint64_t(k), i)));
        ref_acc.add(micro.data(), n);
        if (stage < 2) {
          acc.add(micro.data(), n);
        } else {  // a backward pass: the last tensors' grads first
          const std::size_t split = L.tensors[0][0] + L.tensors[0][1] + L.tensors[0][2];
          opt.reduce_grads(0, 3, tensors, micro.data() + split);
          opt.reduce_grads(0, 0, 3, micro.data());
        }
      }
      const mpopt::step_result want = ref.step(), got = opt.step();
      REQUIRE(got.applied == want.applied);
      CHECK(got.grad_norm == want.grad_norm);
      CHECK(got.clip_coef < 1.0);
    }
    std::vector<float> m(n), ref_m(ref.master(0), ref.master(0) + n);
    opt.gather_master(0, m.data());
    CHECK(same_bits(m, ref_m));
    std::vector<mpopt::bf16_t> params(n);
    opt.gather_params(0, params.data());
    CHECK(same_bits(params, ref_p));
  }
}

TEST_CASE("ZeRO: memory per rank follows the ZeRO formulas") {
  // Ψ a multiple of 4096·W, so no padding: fp16 params and grads, K = 12 (fp32 master + 2 fp32 Adam states):
  // stage 0 (2 + 2 + 12)Ψ, stage 1 2Ψ + 2Ψ + 12Ψ/W, stage 2 2Ψ + 14Ψ/W, stage 3 16Ψ/W. bf16 pure (the param is
  // the master, 2 bf16 states): K = 4.
  const std::size_t W = std::size_t(world_size());
  const std::size_t psi = 4096 * 12;  // divisible by 4096·W for W = 1, 2, 3, 4
  mpopt::comm::mpi comm;
  for (int stage = 0; stage <= 3; ++stage) {
    CAPTURE(stage);
    const std::size_t sharded_master = stage >= 1 ? psi / W : psi;
    {
      std::vector<mpopt::half_t> p(psi), g(psi);
      mpopt::param_group<mpopt::adamw, mpopt::fp16_mixed_policy> spec{p.data(), g.data(), psi, {}, {}};
      mpopt::optimizer<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler> opt({spec}, comm, {stage});
      const mpopt::memory_report m = opt.memory();
      CHECK(m.params == 2 * (stage == 3 ? psi / W : psi));
      CHECK(m.grads == 2 * (stage >= 2 ? psi / W : psi));
      CHECK(m.master == 4 * sharded_master);
      CHECK(m.states == 8 * sharded_master);
      CHECK(m.params + m.grads + m.master + m.states == (stage == 0   ? 16 * psi
                                                         : stage == 1 ? 4 * psi + 12 * psi / W
                                                         : stage == 2 ? 2 * psi + 14 * psi / W
                                                                      : 16 * psi / W));
    }
    {
      std::vector<mpopt::bf16_t> p(psi), g(psi);
      mpopt::param_group<mpopt::adamw, mpopt::bf16_pure_policy> spec{p.data(), g.data(), psi, {}, {}};
      mpopt::optimizer<mpopt::adamw, mpopt::bf16_pure_policy> opt({spec}, comm, {stage});
      const mpopt::memory_report m = opt.memory();
      CHECK(m.master == 0);
      CHECK(m.states == 4 * sharded_master);
    }
  }
}

TEST_CASE("ZeRO: elements communicated per step are 2Ψ for stages 0-2 and 3Ψ for stage 3") {
  // Counted as bus traffic per rank ((W-1)/W of each collective's elements), without the norm (no clipping, no
  // overflow check) so only the grad and param traffic remains.
  const int W = world_size();
  const std::size_t psi = 50000;
  mpopt::no_scaler::args no_check;
  no_check.check_overflow = false;
  for (int stage = 0; stage <= 3; ++stage) {
    CAPTURE(stage);
    std::vector<float> p(psi), g(psi, 0.5f);
    mpopt::param_group<mpopt::sgd, mpopt::fp32_policy> spec{p.data(), g.data(), psi, {psi / 2, psi / 2}, {}};
    mpopt::comm::mpi comm;
    mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy> opt({spec}, comm, {stage}, no_check);
    comm.reset_traffic();
    if (stage == 3) {
      for (int pass = 0; pass < 2; ++pass) {  // forward and backward
        opt.gather(0, 0, 2);
        opt.release(0, 0, 2);
      }
    }
    opt.step();
    const double share = double(W - 1) / double(W);
    CHECK(comm.traffic_so_far().elements == doctest::Approx((stage == 3 ? 3.0 : 2.0) * double(psi) * share));
  }
}

TEST_CASE("ZeRO: misuse is refused with a message naming the value") {
  mpopt::comm::mpi comm;
  std::vector<float> p(100), g(100);
  mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> spec{p.data(), g.data(), 100, {40, 60}, {}};
  using opt_t = mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy>;
  CHECK_THROWS_WITH_AS(opt_t({spec}, comm, {4}), "zero_options.stage must be 0, 1, 2 or 3, got 4", mpopt::error);
  mpopt::zero_options zero_bucket;
  zero_bucket.bucket_elements = 0;
  CHECK_THROWS_WITH_AS(opt_t({spec}, comm, zero_bucket), "zero_options.bucket_elements must be > 0, got 0",
                       mpopt::error);
  {
    opt_t opt({spec}, comm, {1});
    CHECK_THROWS_WITH_AS(opt.reduce_grads(0, 0, 1, g.data()),
                         "reduce_grads: ZeRO stage 1 reduces param_group::grads in step(); reduce_grads is for "
                         "stages 2 and 3",
                         mpopt::error);
    CHECK_THROWS_WITH_AS(opt.gather(0, 0, 1),
                         "gather: params are sharded only at ZeRO stage 3, this optimizer is at stage 1", mpopt::error);
    CHECK_THROWS_WITH_AS(opt.prefetch(0, 0, 1),
                         "prefetch: params are sharded only at ZeRO stage 3, this optimizer is at stage 1",
                         mpopt::error);
  }
  {
    mpopt::zero_options z;
    z.stage = 3;
    z.max_live_elements = 70;
    spec.grads = nullptr;
    opt_t opt({spec}, comm, z);
    CHECK_THROWS_WITH_AS(opt.gather(0, 0, 3), "gather: tensors [0, 3) out of range for group 0 (2 tensors)",
                         mpopt::error);
    CHECK_THROWS_WITH_AS(opt.prefetch(0, 2, 3), "prefetch: tensors [2, 3) out of range for group 0 (2 tensors)",
                         mpopt::error);
    CHECK(opt.prefetch(0, 0, 1));        // 40 live, not yet in use
    CHECK_FALSE(opt.prefetch(0, 0, 1));  // already gathered: nothing to do
    CHECK_FALSE(opt.prefetch(0, 1, 2));  // 60 more do not fit under 70: nothing happens
    CHECK(opt.live_elements() == 40);
    const float* first = opt.gather(0, 0, 1);  // the prefetched range's first use
    CHECK(opt.gather(0, 0, 1) == first);       // and a second
    opt.release(0, 0, 1);
    CHECK(opt.live_elements() == 40);
    CHECK_THROWS_WITH_AS(opt.gather(0, 1, 2),
                         "gather: group 0 tensors [1, 2) need 60 elements but 40 of zero_options.max_live_elements "
                         "= 70 are gathered; release some first",
                         mpopt::error);
    opt.release(0, 0, 1);
    CHECK_THROWS_WITH_AS(opt.release(0, 0, 1), "release: group 0 tensors [0, 1) are not gathered", mpopt::error);
    CHECK(opt.prefetch(0, 1, 2));  // a prefetch that is never used: release() frees it
    CHECK(opt.live_elements() == 60);
    opt.release(0, 1, 2);
    CHECK(opt.live_elements() == 0);
    CHECK_THROWS_WITH_AS(opt.step(), "step: group 0 has no grads: call reduce_grads() or set param_group::grads",
                         mpopt::error);
  }
  if (world_size() > 1) {  // a rank with a different layout: every rank throws instead of hanging
    std::vector<float> q(101), h(101);
    mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> odd{
        q.data(), h.data(), world_rank() == 0 ? 101u : 100u, {}, {}};
    CHECK_THROWS_AS(opt_t({odd}, comm, {2}), mpopt::error);
  }
}
