// Checkpoints of the 1-bit optimizers under mpirun (ctest runs 1, 2, 3 and 4 ranks), with rank-dependent grads so
// that every rank's error buffers differ and matter:
//   - saved in the compressed phase (0/1 Adam: the local phase, mid-interval, where each rank's weights and momentum
//     are its own) and loaded at the same world size, the continuation equals the uninterrupted run bit for bit on
//     every rank: masters, states, params, error buffers, schedule, sync points, LAMB state (fp32 for the three
//     rules, and fp16 + dynamic loss scaling); the same load with the error buffers dropped afterwards diverges, so
//     the test sees them;
//   - saved at world size 1 and loaded at W, or saved at W and loaded at 1 (sub-communicators of the world), the
//     replicated state is restored, the error buffers are zeroed (load() reports it), and training continues exactly
//     as from that state set by hand with fresh error buffers.
#include <mpopt/checkpoint/onebit.hpp>
#include <mpopt/comm/mpi.hpp>
#include <mpopt/mpopt.hpp>
#include <mpopt/onebit/optimizer.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "../checkpoint/mpi_harness.hpp"
#include "../checkpoint/onebit_harness.hpp"
#include "mpi_test.hpp"

namespace {

namespace ck = mpopt::checkpoint;
using ckpt_test::diff;
using ckpt_test::onebit_hparams;
using ckpt_test::options_for;
using ckpt_test::save_after;
using ckpt_test::scaler_args;
using ckpt_test::sub_comm;
using ckpt_test::take_onebit;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

const ckpt_test::shared_space shared_dir{"mpopt_onebit_ckpt_mpi_"};

template <class Rule, class Prec>
struct model : ckpt_test::onebit_model<Rule, Prec> {
  using param_t = typename Prec::param_t;
  using ckpt_test::onebit_model<Rule, Prec>::onebit_model;
  // Step k's grads on `rank`: a common part and a rank's own; an inf on the last rank at an overflow step.
  void make_grads(int k, int rank, bool overflow, double magnitude) {
    using ckpt_test::noise;
    for (std::size_t g = 0; g < 2; ++g)
      for (std::size_t i = 0; i < ckpt_test::onebit_sizes[g]; ++i)
        this->grads[g][i] = mpopt::convert<param_t>(
            magnitude * (0.3 + noise(1000 + std::uint64_t(k), g, i) +
                         0.5 * noise(2000 + std::uint64_t(rank), g, i * 131 + std::uint64_t(k))));
    if (overflow && rank == world_size() - 1)
      this->grads[0][77] = mpopt::convert<param_t>(std::numeric_limits<double>::infinity());
  }
};

template <class Rule, class Prec, class Scaler>
using opt_t = mpopt::onebit::optimizer<Rule, Prec, Scaler>;

// Whether every rank holds the same bytes.
bool same_on_all_ranks(const void* data, std::size_t bytes) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  double v[4] = {double(h >> 32), double(h & 0xffffffffu), -double(h >> 32), -double(h & 0xffffffffu)};
  MPI_Allreduce(MPI_IN_PLACE, v, 4, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return v[0] == -v[2] && v[1] == -v[3];
}

template <class Opt>
double error_mass(const Opt& o) {
  double s = 0;
  for (std::size_t i = 0; i < o.num_error_buffers(); ++i) {
    for (std::size_t k = 0; k < o.errors(i).worker.size(); ++k) s += std::fabs(double(o.errors(i).worker[k]));
    for (std::size_t k = 0; k < o.errors(i).server.size(); ++k) s += std::fabs(double(o.errors(i).server[k]));
  }
  return s;
}

template <class Opt>
void poke_errors(Opt& o) {
  for (std::size_t i = 0; i < o.num_error_buffers(); ++i) {
    for (std::size_t k = 0; k < o.errors(i).worker.size(); ++k) o.errors(i).worker[k] = 0.25f;
    for (std::size_t k = 0; k < o.errors(i).server.size(); ++k) o.errors(i).server[k] = -0.5f;
  }
}

// The replicated state set by hand through the optimizer's setters (the error buffers stay as they are).
template <class Rule, class Prec, class Scaler>
void copy_state(const opt_t<Rule, Prec, Scaler>& from, opt_t<Rule, Prec, Scaler>& to) {
  to.set_step_count(from.step_count());
  to.set_scaler_state(from.scaler_state());
  if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) to.set_schedule(from.current_schedule());
  for (std::size_t g = 0; g < from.num_groups(); ++g) {
    to.set_hparams(g, from.hparams(g));
    to.set_master(g, from.master(g), from.size(g));
    for (int j = 0; j < Rule::max_states; ++j) to.set_state(g, j, from.state(g, j), from.size(g));
    if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>)
      to.set_sync_point(g, from.sync_point(g), from.size(g), from.accumulated_lr(g));
    if constexpr (std::is_same_v<Rule, mpopt::onebit_lamb>) to.set_lamb_state(g, from.lamb_state(g));
  }
}

constexpr int kMore = 4;

template <class Scaler>
struct driver {
  static constexpr bool scaled = std::is_same_v<Scaler, mpopt::dynamic_scaler>;
  int overflow_a, overflow_b;  // steps with an inf on the last rank (dynamic scaling only)
  template <class Model, class Opt>
  void steps(Model& m, Opt& o, int from, int to, int rank) const {
    for (int k = from; k < to; ++k) {
      m.make_grads(k, rank, scaled && (k == overflow_a || k == overflow_b), scaled ? 64.0 : 1.0);
      o.step();
    }
  }
};

// Same world size: N steps, save, a fresh optimizer loads, M steps == N + M uninterrupted steps on every rank.
template <class Rule, class Prec, class Scaler>
void check_resume() {
  using O = opt_t<Rule, Prec, Scaler>;
  const int n = save_after<Rule>(), rank = world_rank();
  const driver<Scaler> d{1, n + 1};  // one overflow in the warm-up, one in the compressed phase
  const std::string what = std::string(Rule::name) + (driver<Scaler>::scaled ? " fp16" : " fp32");
  const std::string tag = rank_tag();
  CAPTURE(what);
  CAPTURE(tag);
  const std::string dir = shared_dir("resume_" + std::string(Rule::name) + (driver<Scaler>::scaled ? "_fp16" : ""));
  mpopt::comm::mpi comm;
  mpopt::step_options so;
  so.max_grad_norm = 2.0;
  const typename Rule::args hp = onebit_hparams<Rule>();
  typename Rule::args other = hp;
  other.lr *= 3;  // restored from the checkpoint
  model<Rule, Prec> ref_m(1), run_m(1), res_m(2), drop_m(3);
  O ref(ref_m.specs(hp), comm, scaler_args<Scaler>(), so, options_for<O>());
  O run(run_m.specs(hp), comm, scaler_args<Scaler>(), so, options_for<O>());
  O resumed(res_m.specs(other), comm, scaler_args<Scaler>(), so, options_for<O>());
  O dropped(drop_m.specs(other), comm, scaler_args<Scaler>(), so, options_for<O>());
  d.steps(ref_m, ref, 0, n + kMore, rank);
  d.steps(run_m, run, 0, n, rank);
  REQUIRE(run.next_phase() != mpopt::onebit::phase::warmup);
  if (world_size() > 1) {
    REQUIRE(error_mass(run) > 0);  // else the errors could not matter
    // 0/1 Adam between synchronisations: each rank's weights are its own, and must come back as such.
    const bool same = same_on_all_ranks(run.master(0), run.size(0) * sizeof(*run.master(0)));
    CHECK(same == !std::is_same_v<Rule, mpopt::zero_one_adam>);
  }

  ck::save(run, dir);
  const ck::onebit_load_result r = ck::load(resumed, dir);
  CHECK(r.errors_restored);
  CHECK(r.saved_world_size == world_size());
  CHECK(r.step == run.step_count());
  const std::string at_load = diff(take_onebit(run), take_onebit(resumed));
  CHECK_MESSAGE(at_load.empty(), "differs right after the load: " << at_load);
  CHECK(ck::load(dropped, dir).errors_restored);
  for (std::size_t i = 0; i < dropped.num_error_buffers(); ++i) dropped.errors(i).reset();  // DeepSpeed's resume

  d.steps(res_m, resumed, n, n + kMore, rank);
  d.steps(drop_m, dropped, n, n + kMore, rank);
  const std::string dd = diff(take_onebit(ref), take_onebit(resumed));
  CHECK_MESSAGE(dd.empty(), "differs after the continuation: " << dd);
  CHECK(ckpt_test::same_groups(res_m.params, ref_m.params));
  if (world_size() > 1) CHECK(diff(take_onebit(ref, false), take_onebit(dropped, false)) != "");
  shared_dir.remove();
}

// Another world size (W > 1): saved by world rank 0 alone and loaded by all W ranks, and the other way round.
template <class Rule>
void check_other_world() {
  using Prec = mpopt::fp32_policy;
  using O = opt_t<Rule, Prec, mpopt::no_scaler>;
  const int world = world_size(), rank = world_rank(), n = save_after<Rule>();
  const driver<mpopt::no_scaler> d{-1, -1};
  const std::string name(Rule::name);
  const std::string tag = rank_tag();
  CAPTURE(name);
  CAPTURE(tag);
  const typename Rule::args hp = onebit_hparams<Rule>();
  typename Rule::args other = hp;
  other.lr *= 3;

  // 1 -> W. Every rank re-runs rank 0's single-rank training locally, to know what was saved.
  const std::string up = shared_dir("up_" + name);
  {
    sub_comm sc(1);
    if (sc.member()) {
      mpopt::comm::mpi one(sc.c);
      model<Rule, Prec> m(1);
      O run(m.specs(hp), one, {}, {}, options_for<O>());
      d.steps(m, run, 0, n, 0);
      ck::save(run, up);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  {
    model<Rule, Prec> single_m(1), loaded_m(2), manual_m(3);
    O single(single_m.specs(hp), {}, {}, options_for<O>());
    d.steps(single_m, single, 0, n, 0);
    mpopt::comm::mpi comm;
    O loaded(loaded_m.specs(other), comm, {}, {}, options_for<O>());
    poke_errors(loaded);  // must be zeroed
    const ck::onebit_load_result r = ck::load(loaded, up);
    CHECK_FALSE(r.errors_restored);
    CHECK(r.saved_world_size == 1);
    CHECK(error_mass(loaded) == 0.0);
    const std::string at_load = diff(take_onebit(single, false), take_onebit(loaded, false));
    CHECK_MESSAGE(at_load.empty(), "1 -> W: differs right after the load: " << at_load);
    O manual(manual_m.specs(hp), comm, {}, {}, options_for<O>());
    copy_state(single, manual);
    d.steps(loaded_m, loaded, n, n + kMore, rank);
    d.steps(manual_m, manual, n, n + kMore, rank);
    CHECK(error_mass(loaded) > 0);  // the continuation compresses across ranks again
    const std::string dd = diff(take_onebit(manual), take_onebit(loaded));
    CHECK_MESSAGE(dd.empty(), "1 -> W: differs after the continuation: " << dd);
  }

  // W -> 1.
  const std::string down = shared_dir("down_" + name);
  mpopt::comm::mpi comm;
  model<Rule, Prec> run_m(1);
  O run(run_m.specs(hp), comm, {}, {}, options_for<O>());
  d.steps(run_m, run, 0, n, rank);
  REQUIRE(error_mass(run) > 0);
  ck::save(run, down);
  {
    sub_comm sc(1);
    if (sc.member()) {
      mpopt::comm::mpi one(sc.c);
      model<Rule, Prec> loaded_m(2), manual_m(3);
      O loaded(loaded_m.specs(other), one, {}, {}, options_for<O>());
      poke_errors(loaded);
      const ck::onebit_load_result r = ck::load(loaded, down);
      CHECK_FALSE(r.errors_restored);
      CHECK(r.saved_world_size == world);
      CHECK(error_mass(loaded) == 0.0);
      const std::string at_load = diff(take_onebit(run, false), take_onebit(loaded, false));
      CHECK_MESSAGE(at_load.empty(), "W -> 1: differs right after the load: " << at_load);
      O manual(manual_m.specs(hp), one, {}, {}, options_for<O>());
      copy_state(run, manual);
      d.steps(loaded_m, loaded, n, n + kMore, 0);
      d.steps(manual_m, manual, n, n + kMore, 0);
      const std::string dd = diff(take_onebit(manual), take_onebit(loaded));
      CHECK_MESSAGE(dd.empty(), "W -> 1: differs after the continuation: " << dd);
    }
  }
  shared_dir.remove();
}

}  // namespace

TEST_CASE("onebit checkpoint: bitwise resume across the compressed phase on every rank, fp32") {
  check_resume<mpopt::onebit_adam, mpopt::fp32_policy, mpopt::no_scaler>();
  check_resume<mpopt::zero_one_adam, mpopt::fp32_policy, mpopt::no_scaler>();
  check_resume<mpopt::onebit_lamb, mpopt::fp32_policy, mpopt::no_scaler>();
}

TEST_CASE("onebit checkpoint: bitwise resume with fp16 params and grads and dynamic loss scaling") {
  check_resume<mpopt::onebit_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>();
  check_resume<mpopt::zero_one_adam, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>();
  check_resume<mpopt::onebit_lamb, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>();
}

TEST_CASE("onebit checkpoint: at another world size the error buffers are zeroed and training continues") {
  if (world_size() < 2) {
    if (world_rank() == 0) MESSAGE("needs 2 or more ranks (the np2-np4 runs cover it)");
    return;
  }
  check_other_world<mpopt::onebit_adam>();
  check_other_world<mpopt::zero_one_adam>();
  check_other_world<mpopt::onebit_lamb>();
}
