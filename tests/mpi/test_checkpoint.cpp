// Checkpoints across world sizes and ZeRO stages: saved by N ranks at stage S, loaded by M ranks at stage S' (each
// a sub-communicator of the world mpirun gives; cases needing more ranks than it has are skipped, so the np4 run
// covers all of them), then trained on. The continuation must equal the uninterrupted single-rank run bit for bit,
// which the library's ZeRO guarantees for sharded runs (tests/mpi/test_zero.cpp). Rank 0 also consolidates the
// sharded checkpoint offline and compares it with the single-rank master (master + compensation, in fp32, for a
// Kahan master).
#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/comm/mpi.hpp>
#include <mpopt/mpopt.hpp>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "../checkpoint/mpi_harness.hpp"
#include "mpi_test.hpp"

namespace {

namespace ck = mpopt::checkpoint;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

constexpr int kSaveAfter = 3, kMore = 3, kOverflowStep = 1;

using ckpt_test::reshard;
using ckpt_test::sub_comm;

const ckpt_test::shared_space shared_dir{"mpopt_ckpt_mpi_"};

template <class Rule, class Prec, class Scaler>
void check_reshard(const typename Rule::args& hp, const typename Scaler::args& sargs, double magnitude,
                   const reshard& r, const std::string& what) {
  using O = mpopt::optimizer<Rule, Prec, Scaler>;
  if (!r.fits()) return;
  const std::string name = r.name(what), tag = rank_tag();
  CAPTURE(name);
  CAPTURE(tag);
  const std::string dir = shared_dir(name);
  mpopt::step_options so;
  so.max_grad_norm = 0.5;

  // The reference: one rank, no communicator, uninterrupted; its snapshot at the save point too.
  ckpt_test::model<Rule, Prec> ref_m(1);
  O ref(ref_m.specs(hp), sargs, so);
  ckpt_test::snapshot<O> at_save;
  for (int k = 0; k < kSaveAfter + kMore; ++k) {
    if (k == kSaveAfter) at_save = ckpt_test::take(ref);
    ref_m.make_grads(k, kOverflowStep, magnitude);
    ref.step();
  }
  const auto want = ckpt_test::take(ref);

  {
    sub_comm sc(r.save_world);
    if (sc.member()) {
      mpopt::comm::mpi comm(sc.c);
      mpopt::zero_options z;
      z.stage = r.save_stage;
      ckpt_test::model<Rule, Prec> m(1);
      O run(m.specs(hp), comm, z, sargs, so);
      for (int k = 0; k < kSaveAfter; ++k) {
        m.make_grads(k, kOverflowStep, magnitude);
        run.step();
      }
      ck::save(run, dir);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);

  if (world_rank() == 0) {  // offline, no communicator: the full weights per tensor
    const std::string out = dir + ".full.safetensors";
    REQUIRE(ck::consolidate(dir, out).ok());
    ck::input_file f;
    REQUIRE(f.open(out).ok());
    ck::safetensors_header h;
    REQUIRE(ck::read_header(f, h).ok());
    // The master as saved; a Kahan master is written as master + compensation in fp32.
    using W = std::conditional_t<ckpt_test::is_kahan_v<O>, float, typename O::master_t>;
    for (std::size_t g = 0; g < 2; ++g) {
      std::vector<W> full, want;
      const std::size_t tensors = ckpt_test::tensors()[g].empty() ? 1 : ckpt_test::tensors()[g].size();
      for (std::size_t t = 0; t < tensors; ++t) {
        const ck::tensor_info* ti = h.find("group" + std::to_string(g) + ".tensor" + std::to_string(t));
        REQUIRE(ti != nullptr);
        std::vector<W> part(ti->elements());
        REQUIRE(f.read(h.data_start + ti->begin, part.data(), part.size() * sizeof(W)).ok());
        full.insert(full.end(), part.begin(), part.end());
      }
      if constexpr (ckpt_test::is_kahan_v<O>) {
        for (std::size_t i = 0; i < at_save.master[g].size(); ++i)
          want.push_back(ckpt_test::kahan_weight_ref(at_save.master[g][i], at_save.compensation[g][i]));
      } else {
        want = at_save.master[g];
      }
      CHECK(ckpt_test::same_bits(full, want));
    }
  }

  {
    sub_comm sc(r.load_world);
    if (sc.member()) {
      mpopt::comm::mpi comm(sc.c);
      mpopt::zero_options z;
      z.stage = r.load_stage;
      ckpt_test::model<Rule, Prec> m(2);  // other initial params: everything must come from the checkpoint
      O resumed(m.specs(hp), comm, z, sargs, so);
      ck::load(resumed, dir);
      for (int k = kSaveAfter; k < kSaveAfter + kMore; ++k) {
        m.make_grads(k, kOverflowStep, magnitude);
        resumed.step();
      }
      const std::string d = ckpt_test::diff(want, ckpt_test::take(resumed));
      CHECK_MESSAGE(d.empty(), d);
      if (r.load_stage < 3)  // every rank's own param buffer, the ranges other ranks own included
        for (std::size_t g = 0; g < 2; ++g) CHECK(ckpt_test::same_bits(m.params[g], want.params[g]));
    }
  }
  shared_dir.remove();
  MPI_Barrier(MPI_COMM_WORLD);
}

const reshard kCases[] = {
    {1, 0, 4, 3},  // 1 -> 4, and stage 0 -> 3
    {4, 2, 2, 1},  // 4 -> 2 (4 ranks: the last owns nothing of group 0)
    {3, 3, 1, 0},  // 3 -> 1
    {2, 1, 3, 2},  // 2 -> 3
    {4, 3, 4, 3},  // same world and stage
    {3, 0, 2, 0},  // replicas: each saving rank writes its partition range, each loading rank reads them all
};

}  // namespace

TEST_CASE("checkpoint: reshard across world sizes and stages, lamb bf16 params + fp32 master") {
  for (const reshard& r : kCases)
    check_reshard<mpopt::lamb, mpopt::bf16_mixed_policy, mpopt::no_scaler>({}, {}, 1.0, r, "lamb_bf16");
}

TEST_CASE("checkpoint: reshard across world sizes and stages, adamw fp16 + dynamic scaler") {
  mpopt::dynamic_scale_args s;
  s.init_scale = 1024.f;
  s.scale_window = 2;
  s.hysteresis = 1;
  for (const reshard& r : kCases)
    check_reshard<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>({}, s, 64.0, r, "adamw_fp16");
}

using kahan_fp32_states_policy =
    mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t, mpopt::kahan_summation>,
                     mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;

TEST_CASE("checkpoint: reshard a Kahan master and its compensation, adamw all-bf16") {
  const reshard cases[] = {
      {4, 2, 2, 1},  // 4 -> 2
      {1, 0, 3, 3},  // 1 -> 3, and stage 0 -> 3
      {2, 3, 4, 0},  // 2 -> 4 replicas: each rank reads every saved compensation piece
  };
  for (const reshard& r : cases) {
    check_reshard<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler>({}, {}, 1.0, r, "adamw_kahan");
    check_reshard<mpopt::adamw, kahan_fp32_states_policy, mpopt::no_scaler>({}, {}, 1.0, r, "adamw_kahan_fp32_states");
  }
}

TEST_CASE("checkpoint: a Kahan checkpoint at other master roundings, sharded") {
  if (world_size() < 2) return;
  using kahan_o = mpopt::optimizer<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler>;
  const std::string dir = shared_dir("kahan_cross");
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 2;
  ckpt_test::model<mpopt::adamw, mpopt::bf16_kahan_policy> m(1);
  kahan_o o(m.specs({}), comm, z);
  for (int k = 0; k < 3; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  ck::save(o, dir);
  const auto saved = ckpt_test::take(o);

  // Refused on every rank by default, naming both values; nothing changes.
  using nearest_o = mpopt::optimizer<mpopt::adamw, mpopt::bf16_pure_policy, mpopt::no_scaler>;
  ckpt_test::model<mpopt::adamw, mpopt::bf16_pure_policy> nm(2);
  nearest_o no(nm.specs({}), comm, z);
  const auto before = ckpt_test::take(no);
  ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(no, dir); }),
                         {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"nearest\""});
  CHECK(ckpt_test::diff(before, ckpt_test::take(no)).empty());

  // Asked for: an fp32 master at another stage and world size takes master + compensation.
  {
    sub_comm sc(std::max(2, world_size() - 1));
    if (sc.member()) {
      mpopt::comm::mpi sub(sc.c);
      mpopt::zero_options z1;
      z1.stage = 1;
      ckpt_test::model<mpopt::adamw, mpopt::bf16_mixed_policy> wm(2);
      mpopt::optimizer<mpopt::adamw, mpopt::bf16_mixed_policy, mpopt::no_scaler> wide(wm.specs({}), sub, z1);
      ck::load_options lo;
      lo.convert_dtypes = true;
      lo.convert_master_rounding = true;
      ck::load(wide, dir, lo);
      for (std::size_t g = 0; g < 2; ++g) {
        std::vector<float> full(ckpt_test::group_size(g));
        wide.gather_master(g, full.data());
        for (std::size_t i = 0; i < full.size(); ++i)
          REQUIRE(full[i] == ckpt_test::kahan_weight_ref(saved.master[g][i], saved.compensation[g][i]));
      }
    }
  }
  shared_dir.remove();
}

TEST_CASE("checkpoint: a rank's bad file fails the load on every rank, and nothing changes") {
  if (world_size() < 2) return;
  using O = mpopt::optimizer<mpopt::lamb, mpopt::bf16_mixed_policy, mpopt::no_scaler>;
  const std::string dir = shared_dir("bad_file");
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 1;
  ckpt_test::model<mpopt::lamb, mpopt::bf16_mixed_policy> m(1);
  O o(m.specs({}), comm, z);
  m.make_grads(0, -1, 1.0);
  o.step();
  ck::save(o, dir);
  ckpt_test::truncate_rank0_file(dir);
  ckpt_test::model<mpopt::lamb, mpopt::bf16_mixed_policy> m2(2);
  O fresh(m2.specs({}), comm, z);
  const auto before = ckpt_test::take(fresh);
  ckpt_test::check_rank0_truncated(ckpt_test::error_of([&] { ck::load(fresh, dir); }));
  CHECK(ckpt_test::diff(before, ckpt_test::take(fresh)).empty());
  shared_dir.remove();
}

// For the mpopt-consolidate ctest (tests/checkpoint/consolidate_test.cmake): sharded checkpoints where told to.
TEST_CASE("checkpoint: fixture for the consolidation tool test") {
  mpopt::comm::mpi comm;
  ckpt_test::save_consolidation_fixtures(comm);
}
