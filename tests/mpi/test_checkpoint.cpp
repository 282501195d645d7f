// Checkpoints across world sizes and ZeRO stages: saved by N ranks at stage S, loaded by M ranks at stage S' (each
// a sub-communicator of the world mpirun gives; cases needing more ranks than it has are skipped, so the np4 run
// covers all of them), then trained on. The continuation must equal the uninterrupted single-rank run bit for bit,
// which the library's ZeRO guarantees for sharded runs (tests/mpi/test_zero.cpp). Rank 0 also consolidates the
// sharded checkpoint offline and compares it with the single-rank master.
#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/comm/mpi.hpp>
#include <mpopt/mpopt.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "mpi_test.hpp"

namespace {

namespace ck = mpopt::checkpoint;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

constexpr int kSaveAfter = 3, kMore = 3, kOverflowStep = 1;

// The first n world ranks, or nothing on the others.
struct sub_comm {
  MPI_Comm c = MPI_COMM_NULL;
  explicit sub_comm(int n) { MPI_Comm_split(MPI_COMM_WORLD, world_rank() < n ? 0 : MPI_UNDEFINED, world_rank(), &c); }
  ~sub_comm() {
    if (c != MPI_COMM_NULL) MPI_Comm_free(&c);
  }
  bool member() const { return c != MPI_COMM_NULL; }
};

// A directory every rank agrees on (rank 0's pid), removed by rank 0 at the end.
std::string shared_dir(const std::string& name) {
  int pid = world_rank() == 0 ? int(::getpid()) : 0;
  MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return (std::filesystem::temp_directory_path() / ("mpopt_ckpt_mpi_" + std::to_string(pid)) / name).string();
}

struct reshard {
  int save_world, save_stage, load_world, load_stage;
};

template <class Rule, class Prec, class Scaler>
void check_reshard(const typename Rule::args& hp, const typename Scaler::args& sargs, double magnitude,
                   const reshard& r, const std::string& what) {
  using O = mpopt::optimizer<Rule, Prec, Scaler>;
  CAPTURE(what);
  const std::string tag = rank_tag();
  CAPTURE(tag);
  CAPTURE(r.save_world);
  CAPTURE(r.save_stage);
  CAPTURE(r.load_world);
  CAPTURE(r.load_stage);
  if (std::max(r.save_world, r.load_world) > world_size()) return;
  const std::string dir = shared_dir(what + "_" + std::to_string(r.save_world) + "s" + std::to_string(r.save_stage) +
                                     "_" + std::to_string(r.load_world) + "s" + std::to_string(r.load_stage));
  mpopt::step_options so;
  so.max_grad_norm = 0.5;

  // The reference: one rank, no communicator, uninterrupted; its snapshot at the save point too.
  ckpt_test::model<Rule, Prec> ref_m(1);
  O ref(ref_m.specs(hp), sargs, so);
  std::vector<std::vector<typename O::master_t>> master_at_save;
  for (int k = 0; k < kSaveAfter + kMore; ++k) {
    if (k == kSaveAfter) master_at_save = ckpt_test::take(ref).master;
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

  if (world_rank() == 0) {  // offline, no communicator: the full master per tensor
    const std::string out = dir + ".full.safetensors";
    REQUIRE(ck::consolidate(dir, out).ok());
    ck::input_file f;
    REQUIRE(f.open(out).ok());
    ck::safetensors_header h;
    REQUIRE(ck::read_header(f, h).ok());
    for (std::size_t g = 0; g < 2; ++g) {
      std::vector<typename O::master_t> full;
      const std::size_t tensors = ckpt_test::tensors()[g].empty() ? 1 : ckpt_test::tensors()[g].size();
      for (std::size_t t = 0; t < tensors; ++t) {
        const ck::tensor_info* ti = h.find("group" + std::to_string(g) + ".tensor" + std::to_string(t));
        REQUIRE(ti != nullptr);
        std::vector<typename O::master_t> part(ti->elements());
        REQUIRE(f.read(h.data_start + ti->begin, part.data(), part.size() * sizeof(typename O::master_t)).ok());
        full.insert(full.end(), part.begin(), part.end());
      }
      CHECK(ckpt_test::same_bits(full, master_at_save[g]));
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
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
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
  if (world_rank() == 0) {  // rank 0's file loses its tail: at stage 1 only rank 0 reads it
    const std::string f = dir + "/" + ck::rank_file_name(0, world_size());
    std::filesystem::resize_file(f, std::filesystem::file_size(f) - 1);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  ckpt_test::model<mpopt::lamb, mpopt::bf16_mixed_policy> m2(2);
  O fresh(m2.specs({}), comm, z);
  const auto before = ckpt_test::take(fresh);
  std::string msg;
  try {
    ck::load(fresh, dir);
  } catch (const mpopt::error& e) {
    msg = e.what();
  }
  CAPTURE(msg);
  if (world_rank() == 0) {
    CHECK(msg.find("(truncated)") != std::string::npos);
  } else {
    CHECK(msg.find("checkpoint load: failed on rank 0 (its error says why); nothing was changed") != std::string::npos);
  }
  CHECK(ckpt_test::diff(before, ckpt_test::take(fresh)).empty());
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

// For the mpopt-consolidate ctest (tests/checkpoint/consolidate_test.cmake): a sharded checkpoint where told to.
TEST_CASE("checkpoint: fixture for the consolidation tool test") {
  const char* where = std::getenv("MPOPT_CHECKPOINT_FIXTURE");
  if (where == nullptr) return;
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 2;
  ckpt_test::model<mpopt::lamb, mpopt::bf16_mixed_policy> m(1);
  mpopt::optimizer<mpopt::lamb, mpopt::bf16_mixed_policy, mpopt::no_scaler> o(m.specs({}), comm, z);
  for (int k = 0; k < 3; ++k) {
    m.make_grads(k, -1, 1.0);
    o.step();
  }
  ck::save(o, where);
}
