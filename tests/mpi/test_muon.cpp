// mpopt::muon_optimizer under ZeRO stages 0-2 over MPI at the world size mpirun gives (ctest runs 1-4): every stage
// must reproduce the single-rank trajectory bit for bit (params, master, momentum and AdamW states, grad norm, loss
// scale, skips). Why bit for bit holds: matrices are never split (each has one owner, who runs the same
// deterministic Newton–Schulz as a single rank), the grad mean of W equal grads is exact (fp64 reduction for fp32
// grads, fp32 for 16-bit ones), and the norm is added per tensor in one order everywhere. Stage 3 is refused.
#include <mpopt/comm/mpi.hpp>
#include <mpopt/muon.hpp>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "mpi_test.hpp"

// Counting global new, for "a step allocates nothing" (this test binary's own replacement).
namespace {
std::atomic<long> allocations{0};
}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

namespace {

using mpopt::matrix_shape;
using mpopt::muon_part;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^ c;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return double(x >> 11) / double(1ull << 52) - 1.0;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Matrices of different sizes (so owners differ), tall and wide; aux tensors with a zero-sized one and one larger
// than the collectives' bucket.
const std::vector<std::vector<matrix_shape>> matrix_layout = {{{24, 40}, {40, 24}, {16, 16}, {8, 64}, {33, 7}},
                                                              {{20, 30}}};
const std::vector<std::vector<std::size_t>> aux_layout = {{7, 0, 5000, 1}, {300}};

constexpr int kSteps = 5;
constexpr int kOverflowStep = 2;  // a NaN in one matrix element, on the last rank only: every rank must skip

template <class Prec>
struct buffers {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<std::vector<param_t>> mp, ap;
  std::vector<std::vector<grad_t>> mg, ag;
  std::vector<mpopt::muon_group<Prec>> matrices;
  std::vector<mpopt::param_group<mpopt::adamw, Prec>> aux;

  explicit buffers(bool with_grads) {
    mpopt::muon::args hp;
    hp.lr = 0.02;
    mpopt::adamw::args ah;
    ah.lr = 3e-3;
    for (std::size_t g = 0; g < matrix_layout.size(); ++g) {
      mpopt::muon_group<Prec> spec;
      spec.shapes = matrix_layout[g];
      spec.hparams = hp;
      spec.hparams.nesterov = g == 0;
      const std::size_t n = spec.size();
      mp.emplace_back(n);
      mg.emplace_back(n);
      for (std::size_t i = 0; i < n; ++i) mp[g][i] = mpopt::convert<param_t>(0.1 * noise(g, i, 7));
      matrices.push_back(spec);
    }
    for (std::size_t g = 0; g < aux_layout.size(); ++g) {
      mpopt::param_group<mpopt::adamw, Prec> spec;
      spec.tensor_sizes = aux_layout[g];
      for (std::size_t s : aux_layout[g]) spec.size += s;
      spec.hparams = ah;
      spec.hparams.amsgrad = g == 1;
      ap.emplace_back(spec.size);
      ag.emplace_back(spec.size);
      for (std::size_t i = 0; i < spec.size; ++i) ap[g][i] = mpopt::convert<param_t>(noise(10 + g, i, 7));
      aux.push_back(spec);
    }
    for (std::size_t g = 0; g < matrices.size(); ++g) {
      matrices[g].params = mp[g].data();
      matrices[g].grads = with_grads ? mg[g].data() : nullptr;
    }
    for (std::size_t g = 0; g < aux.size(); ++g) {
      aux[g].params = ap[g].data();
      aux[g].grads = with_grads ? ag[g].data() : nullptr;
    }
  }

  void set_grads(int step, bool nan) {
    for (std::size_t g = 0; g < mg.size(); ++g)
      for (std::size_t i = 0; i < mg[g].size(); ++i)
        mg[g][i] = mpopt::convert<grad_t>(noise(100 + std::uint64_t(step), g, i) + 0.2 * double(i % 13) / 13.0);
    for (std::size_t g = 0; g < ag.size(); ++g)
      for (std::size_t i = 0; i < ag[g].size(); ++i)
        ag[g][i] = mpopt::convert<grad_t>(0.1 * noise(200 + std::uint64_t(step), g, i));
    if (nan) mg[0][1234] = mpopt::convert<grad_t>(std::numeric_limits<double>::quiet_NaN());
  }
};

// How grads reach step(): the groups' own grads, reduce_grads() (stage 2), or the two in turn, the groups' own on
// even steps (a step must leave nothing behind for the next step's reduce_grads() to add to).
enum class feed { group_grads, reduce_grads, alternating };

template <class Prec>
void check_equivalence(int stage, feed grads_feed, const std::string& what) {
  using opt_t = mpopt::muon_optimizer<Prec>;
  using master_t = typename Prec::master_t;
  using state_t = typename Prec::state_t;
  CAPTURE(what);
  CAPTURE(stage);
  const std::string tag = rank_tag();
  CAPTURE(tag);
  const int W = world_size();
  buffers<Prec> ref_buf(true), buf(grads_feed != feed::reduce_grads);
  mpopt::step_options opts;
  opts.max_grad_norm = 2.0;  // clips on some steps
  opt_t ref(ref_buf.matrices, ref_buf.aux, {}, opts);
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = stage;
  z.bucket_elements = 1000;  // several pieces, not aligned to tensors or owners
  opt_t opt(buf.matrices, buf.aux, comm, z, {}, opts);

  // Every tensor has one owner, and at stages 1-2 the states are split between the ranks with nothing duplicated.
  for (std::size_t g = 0; g < matrix_layout.size(); ++g)
    for (std::size_t t = 0; t < matrix_layout[g].size(); ++t) {
      const int o = opt.owner(muon_part::matrices, g, t);
      CHECK((o >= 0 && o < W));
    }
  double states = double(opt.memory().states), master = double(opt.memory().master);
  if (stage >= 1) {
    comm.all_reduce(&states, 1, mpopt::comm::reduce_op::sum);
    comm.all_reduce(&master, 1, mpopt::comm::reduce_op::sum);
  }
  CHECK(states == double(ref.memory().states));
  CHECK(master == double(ref.memory().master));

  for (int step = 0; step < kSteps; ++step) {
    CAPTURE(step);
    ref_buf.set_grads(step, step == kOverflowStep);
    buf.set_grads(step, step == kOverflowStep && world_rank() == W - 1);
    if (grads_feed == feed::reduce_grads || (grads_feed == feed::alternating && step % 2 == 1)) {
      // as a backward pass would: tensor by tensor, last first
      for (std::size_t g = matrix_layout.size(); g-- > 0;) {
        std::size_t end = buf.mg[g].size();
        for (std::size_t t = matrix_layout[g].size(); t-- > 0;) {
          end -= matrix_layout[g][t].rows * matrix_layout[g][t].cols;
          opt.reduce_grads(muon_part::matrices, g, t, t + 1, buf.mg[g].data() + end);
        }
      }
      for (std::size_t g = 0; g < aux_layout.size(); ++g)  // a whole group at once
        opt.reduce_grads(muon_part::aux, g, 0, aux_layout[g].size(), buf.ag[g].data());
    }
    const mpopt::step_result want = ref.step();
    const mpopt::step_result got = opt.step();
    REQUIRE(got.applied == want.applied);
    CHECK(got.applied == (step != kOverflowStep));
    CHECK(got.reason == want.reason);
    CHECK(got.step == want.step);
    CHECK(got.loss_scale == want.loss_scale);
    if (got.applied) {
      CHECK(got.grad_norm == want.grad_norm);
      CHECK(got.clip_coef == want.clip_coef);
    }
    for (std::size_t g = 0; g < matrix_layout.size(); ++g) {
      CAPTURE(g);
      const std::size_t n = ref_buf.mp[g].size();
      CHECK(same_bits(buf.mp[g], ref_buf.mp[g]));
      std::vector<master_t> m(n), ref_m(n);
      opt.gather_master(muon_part::matrices, g, m.data());
      ref.gather_master(muon_part::matrices, g, ref_m.data());
      CHECK(same_bits(m, ref_m));
      std::vector<state_t> s(n), ref_s(n);
      opt.gather_state(muon_part::matrices, g, 0, s.data());
      ref.gather_state(muon_part::matrices, g, 0, ref_s.data());
      CHECK(same_bits(s, ref_s));
    }
    for (std::size_t g = 0; g < aux_layout.size(); ++g) {
      CAPTURE(g);
      const std::size_t n = ref_buf.ap[g].size();
      CHECK(same_bits(buf.ap[g], ref_buf.ap[g]));
      std::vector<master_t> m(n), ref_m(n);
      opt.gather_master(muon_part::aux, g, m.data());
      ref.gather_master(muon_part::aux, g, ref_m.data());
      CHECK(same_bits(m, ref_m));
      for (int j = 0; j < (g == 1 ? 3 : 2); ++j) {
        std::vector<state_t> s(n), ref_s(n);
        opt.gather_state(muon_part::aux, g, j, s.data());
        ref.gather_state(muon_part::aux, g, j, ref_s.data());
        CHECK(same_bits(s, ref_s));
      }
    }
  }
}

}  // namespace

TEST_CASE("muon ZeRO stages 0-2 reproduce the single-rank trajectory bit for bit (fp32)") {
  for (int stage = 0; stage <= 2; ++stage) check_equivalence<mpopt::fp32_policy>(stage, feed::group_grads, "fp32");
  check_equivalence<mpopt::fp32_policy>(2, feed::reduce_grads, "fp32, reduce_grads per tensor");
}

TEST_CASE("muon ZeRO stage 2: group grads and reduce_grads() in turn reproduce the single-rank trajectory") {
  check_equivalence<mpopt::fp32_policy>(2, feed::alternating, "fp32, group grads and reduce_grads in turn");
}

TEST_CASE("muon ZeRO stages 0-2 reproduce the single-rank trajectory bit for bit (bf16 params, fp32 master)") {
  for (int stage = 0; stage <= 2; ++stage)
    check_equivalence<mpopt::bf16_mixed_policy>(stage, feed::group_grads, "bf16 mixed");
  check_equivalence<mpopt::bf16_mixed_policy>(2, feed::reduce_grads, "bf16 mixed, reduce_grads per tensor");
}

TEST_CASE("muon ZeRO stage 3 is refused with the stage named; a layout mismatch is caught on every rank") {
  buffers<mpopt::fp32_policy> b(true);
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 3;
  CHECK_THROWS_WITH_AS(mpopt::muon_optimizer<mpopt::fp32_policy>(b.matrices, b.aux, comm, z),
                       "muon_optimizer: ZeRO stage 3 is not supported (Newton-Schulz needs whole matrices and stage 3 "
                       "shards params); use zero_options.stage 0, 1 or 2",
                       mpopt::error);
  if (world_size() > 1) {
    z.stage = 1;
    auto matrices = b.matrices;
    if (world_rank() == 0) matrices[1].shapes = {{30, 20}};  // same size, other shape
    CHECK_THROWS_AS(mpopt::muon_optimizer<mpopt::fp32_policy>(matrices, b.aux, comm, z), mpopt::error);
  }
}

TEST_CASE("a muon step allocates nothing (one rank: the MPI communicator allocates its own count arrays)") {
  mpopt::comm::single_rank one;
  for (int stage : {0, 2}) {
    CAPTURE(stage);
    buffers<mpopt::bf16_mixed_policy> b(true);
    b.set_grads(0, false);
    mpopt::zero_options z;
    z.stage = stage;
    mpopt::step_options clip;
    clip.max_grad_norm = 1.0;
    mpopt::muon_optimizer<mpopt::bf16_mixed_policy> opt(b.matrices, b.aux, one, z, {}, clip);
    opt.step();  // the first may start OpenMP's thread pool
    const long before = allocations.load();
    for (int i = 0; i < 3; ++i) {
      if (stage == 2) opt.reduce_grads(muon_part::matrices, 0, 0, matrix_layout[0].size(), b.mg[0].data());
      opt.step();
    }
    CHECK(allocations.load() - before == 0);
  }
}
