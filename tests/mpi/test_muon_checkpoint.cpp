// Checkpoints of mpopt::muon_optimizer across world sizes and ZeRO stages (checkpoint/muon.hpp): saved by N ranks at
// stage S, loaded by M ranks at stage S' (each a sub-communicator of the world mpirun gives; cases needing more ranks
// than it has are skipped, so the np4 run covers all of them), then trained on. The continuation must equal the
// uninterrupted single-rank run bit for bit: every tensor is updated whole by one rank with the same arithmetic at
// any world size (tests/mpi/test_muon.cpp), so moving tensors to other owners changes no bit; a Kahan master's
// compensation moves with it. Also: each rank's file holds exactly the tensors it owns, rank 0 consolidates the
// checkpoint offline (a Kahan one as master + compensation), a Kahan checkpoint folds into a nearest-rounding master
// at another world size when asked, and a bad file on one rank fails the load on every rank with nothing changed.

// GCC 12 at -O3 reports a null memmove destination inside std::vector<matrix_shape>::operator= (-Wnonnull): a false
// positive of its middle end, not located in this file; nothing here copies into a null buffer.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wnonnull"
#endif
#include <mpopt/checkpoint/checkpoint.hpp>
#include <mpopt/checkpoint/consolidate.hpp>
#include <mpopt/checkpoint/muon.hpp>
#include <mpopt/comm/mpi.hpp>
#include <mpopt/mpopt.hpp>
#include <mpopt/muon.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../checkpoint/harness.hpp"
#include "../checkpoint/mpi_harness.hpp"
#include "../checkpoint/muon_harness.hpp"
#include "mpi_test.hpp"

namespace {

namespace ck = mpopt::checkpoint;
using ckpt_test::diff;
using ckpt_test::noise;
using ckpt_test::reshard;
using ckpt_test::same_bits;
using ckpt_test::same_groups;
using ckpt_test::scaler_args;
using ckpt_test::sub_comm;
using ckpt_test::take_muon;
using mpopt::matrix_shape;
using mpopt::muon_part;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

// Matrices of different costs (so the owners differ with the world size), tall and wide; aux tensors with a
// zero-sized one and one larger than the collectives' bucket; amsgrad on one aux group.
const std::vector<std::vector<matrix_shape>> kMatrices = {{{24, 40}, {40, 24}, {16, 16}, {8, 64}, {33, 7}}, {{20, 30}}};
const std::vector<std::vector<std::size_t>> kAux = {{7, 0, 1500, 1}, {300}};

constexpr int kSaveAfter = 3, kMore = 3, kOverflowStep = 1;

template <class Prec>
struct model {
  using param_t = typename Prec::param_t;
  using grad_t = typename Prec::grad_t;
  std::vector<std::vector<param_t>> mp, ap;
  std::vector<std::vector<grad_t>> mg, ag;
  std::vector<mpopt::muon_group<Prec>> matrices;
  std::vector<mpopt::param_group<mpopt::adamw, Prec>> aux;

  // lr_factor != 1: hyper-parameters other than the saved ones (load must restore them).
  model(std::uint64_t seed, double lr_factor) {
    for (std::size_t g = 0; g < kMatrices.size(); ++g) {
      mpopt::muon_group<Prec> spec;
      spec.shapes = kMatrices[g];
      spec.hparams.lr = 0.02 * lr_factor;
      spec.hparams.nesterov = g == 0;
      mp.emplace_back(spec.size());
      mg.emplace_back(spec.size());
      for (std::size_t i = 0; i < spec.size(); ++i) mp[g][i] = mpopt::convert<param_t>(0.1 * noise(seed, g, i));
      matrices.push_back(spec);
    }
    for (std::size_t g = 0; g < kAux.size(); ++g) {
      mpopt::param_group<mpopt::adamw, Prec> spec;
      spec.tensor_sizes = kAux[g];
      for (std::size_t s : kAux[g]) spec.size += s;
      spec.hparams.lr = 3e-3 * lr_factor;
      spec.hparams.amsgrad = g == 1;
      ap.emplace_back(spec.size);
      ag.emplace_back(spec.size);
      for (std::size_t i = 0; i < spec.size; ++i) ap[g][i] = mpopt::convert<param_t>(noise(seed, 10 + g, i));
      aux.push_back(spec);
    }
    for (std::size_t g = 0; g < matrices.size(); ++g) {
      matrices[g].params = mp[g].data();
      matrices[g].grads = mg[g].data();
    }
    for (std::size_t g = 0; g < aux.size(); ++g) {
      aux[g].params = ap[g].data();
      aux[g].grads = ag[g].data();
    }
  }
  // The grads of step k, the same on every rank; at the overflow step a NaN where `nan` (one rank: all must skip).
  void make_grads(int k, bool nan, double magnitude) {
    for (std::size_t g = 0; g < mg.size(); ++g)
      for (std::size_t i = 0; i < mg[g].size(); ++i)
        mg[g][i] =
            mpopt::convert<grad_t>(magnitude * (noise(100 + std::uint64_t(k), g, i) + 0.2 * double(i % 13) / 13.0));
    for (std::size_t g = 0; g < ag.size(); ++g)
      for (std::size_t i = 0; i < ag[g].size(); ++i)
        ag[g][i] = mpopt::convert<grad_t>(magnitude * 0.1 * noise(200 + std::uint64_t(k), g, i));
    if (k == kOverflowStep && nan) mg[0][1234] = mpopt::convert<grad_t>(std::numeric_limits<double>::quiet_NaN());
  }
};

template <class Opt>
using snapshot = ckpt_test::muon_snapshot<Opt>;

const ckpt_test::shared_space shared_dir{"mpopt_muon_ckpt_mpi_"};

template <class Prec, class Scaler, class Gemm = mpopt::muon_gemm<float>>
void check_reshard(const reshard& r, const std::string& what) {
  using O = mpopt::muon_optimizer<Prec, Scaler, Gemm>;
  using master_t = typename O::master_t;
  if (!r.fits()) return;
  const std::string name = r.name(what), tag = rank_tag();
  CAPTURE(name);
  CAPTURE(tag);
  const std::string dir = shared_dir(name);
  constexpr bool scaled = std::is_same_v<Scaler, mpopt::dynamic_scaler>;
  const double magnitude = scaled ? 64.0 : 1.0;
  mpopt::step_options so;
  so.max_grad_norm = 20.0;
  so.rounding_seed = 99;

  // The reference: one rank, no communicator, uninterrupted; its master at the save point too.
  model<Prec> ref_m(1, 1.0);
  O ref(ref_m.matrices, ref_m.aux, scaler_args<Scaler>(), so);
  snapshot<O> at_save;
  std::vector<std::vector<typename Prec::param_t>> mp_at_save, ap_at_save;
  for (int k = 0; k < kSaveAfter + kMore; ++k) {
    if (k == kSaveAfter) {
      at_save = take_muon(ref);
      mp_at_save = ref_m.mp;
      ap_at_save = ref_m.ap;
    }
    ref_m.make_grads(k, true, magnitude);
    ref.step();
  }
  CHECK(ref.step_count() == kSaveAfter + kMore - 1);  // the NaN step was skipped
  const snapshot<O> want = take_muon(ref);

  {
    sub_comm sc(r.save_world);
    if (sc.member()) {
      mpopt::comm::mpi comm(sc.c);
      mpopt::zero_options z;
      z.stage = r.save_stage;
      z.bucket_elements = 1000;  // several pieces, not aligned to tensors
      model<Prec> m(1, 1.0);
      O run(m.matrices, m.aux, comm, z, scaler_args<Scaler>(), so);
      for (int k = 0; k < kSaveAfter; ++k) {
        m.make_grads(k, comm.rank() == comm.size() - 1, magnitude);
        run.step();
      }
      ck::save(run, dir);

      // Each file holds exactly the tensors its rank owns, whole (the others empty); the index's ranges say so.
      if (comm.rank() == 0) {
        ck::index ix;
        REQUIRE(ck::read_index(dir, ix).ok());
        REQUIRE(ix.files.size() == std::size_t(r.save_world));
        std::size_t k = 0;
        for (muon_part part : {muon_part::matrices, muon_part::aux})
          for (std::size_t g = 0; g < (part == muon_part::matrices ? kMatrices.size() : kAux.size()); ++g)
            for (std::size_t t = 0; t < run.num_tensors(part, g); ++t, ++k) {
              const int owner = run.owner(part, g, t);
              const std::size_t n = run.tensor_size(part, g, t);
              CHECK(ix.metadata.at("group." + std::to_string(k) + ".owner") == std::to_string(owner));
              for (int q = 0; q < r.save_world; ++q) {
                const mpopt::zero::range want_range{q <= owner ? 0 : n, q < owner ? 0 : n};
                CHECK(ix.files[std::size_t(q)].ranges[k] == want_range);
                ck::input_file f;
                ck::safetensors_header h;
                REQUIRE(f.open(dir + "/" + ck::rank_file_name(q, r.save_world)).ok());
                REQUIRE(ck::read_header(f, h).ok());
                const ck::tensor_info* ti = h.find(ck::master_tensor(k));
                REQUIRE(ti != nullptr);
                CHECK(ti->elements() == (q == owner ? n : 0));
                if constexpr (ckpt_test::is_kahan_v<O>) {
                  const ck::tensor_info* ci = h.find(ck::compensation_tensor(k));
                  REQUIRE(ci != nullptr);
                  CHECK(ci->elements() == (q == owner ? n : 0));
                }
              }
            }
        CHECK(k == ix.groups.size());
      }
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);

  if (world_rank() == 0) {  // offline, no communicator: tensor k's weights, in group order
    // A Kahan checkpoint consolidates to fp32 master + compensation, recomputed here in fp64.
    using out_t = std::conditional_t<ckpt_test::is_kahan_v<O>, float, master_t>;
    const std::string out = dir + ".full.safetensors";
    REQUIRE(ck::consolidate(dir, out).ok());
    ck::input_file f;
    REQUIRE(f.open(out).ok());
    ck::safetensors_header h;
    REQUIRE(ck::read_header(f, h).ok());
    std::size_t k = 0;
    for (std::size_t g = 0; g < at_save.master.size(); ++g) {
      std::vector<out_t> full, want;
      while (full.size() < at_save.master[g].size()) {
        const ck::tensor_info* ti = h.find("group" + std::to_string(k++) + ".tensor0");
        REQUIRE(ti != nullptr);
        std::vector<out_t> part(ti->elements());
        REQUIRE(f.read(h.data_start + ti->begin, part.data(), part.size() * sizeof(out_t)).ok());
        full.insert(full.end(), part.begin(), part.end());
      }
      if constexpr (ckpt_test::is_kahan_v<O>) {
        for (std::size_t i = 0; i < at_save.master[g].size(); ++i)
          want.push_back(ckpt_test::kahan_weight_ref(at_save.master[g][i], at_save.compensation[g][i]));
      } else {
        want = at_save.master[g];
      }
      CHECK(same_bits(full, want));
    }
  }

  {
    sub_comm sc(r.load_world);
    if (sc.member()) {
      mpopt::comm::mpi comm(sc.c);
      mpopt::zero_options z;
      z.stage = r.load_stage;
      model<Prec> m(2, 3.0);  // other initial params and lr: everything must come from the checkpoint
      O resumed(m.matrices, m.aux, comm, z, scaler_args<Scaler>(), so);
      ck::load(resumed, dir);
      CHECK(resumed.matrix_hparams(0).lr == 0.02);
      const std::string at_load = diff(at_save, take_muon(resumed));
      CHECK_MESSAGE(at_load.empty(), "differs right after the load: " << at_load);
      CHECK(same_groups(m.mp, mp_at_save));  // every rank's param copy, the tensors other ranks own included
      CHECK(same_groups(m.ap, ap_at_save));
      for (int k = kSaveAfter; k < kSaveAfter + kMore; ++k) {
        m.make_grads(k, comm.rank() == 0, magnitude);
        resumed.step();
      }
      const std::string d = diff(want, take_muon(resumed));
      CHECK_MESSAGE(d.empty(), "differs after the continuation: " << d);
      CHECK(same_groups(m.mp, ref_m.mp));
      CHECK(same_groups(m.ap, ref_m.ap));
    }
  }
  shared_dir.remove();
}

const reshard kCases[] = {
    {4, 1, 2, 2},  // 4 -> 2, stage 1 -> 2
    {3, 2, 1, 0},  // 3 -> 1
    {1, 0, 4, 1},  // 1 -> 4
    {2, 0, 3, 2},  // 2 -> 3; at stage 0 the replicas split the writing by owner
    {4, 2, 4, 2},  // same world and stage
    {2, 1, 1, 2},  // the cases that fit the np2 and np1 runs
    {1, 2, 2, 0}, {1, 1, 1, 2},
};

}  // namespace

TEST_CASE("muon checkpoint: reshard across world sizes and stages, fp32") {
  for (const reshard& r : kCases) check_reshard<mpopt::fp32_policy, mpopt::no_scaler>(r, "fp32");
}

TEST_CASE("muon checkpoint: reshard across world sizes and stages, bf16 params + fp32 master, dynamic scaler") {
  for (const reshard& r : kCases) check_reshard<mpopt::bf16_mixed_policy, mpopt::dynamic_scaler>(r, "bf16");
}

// Stochastic rounding draws from (seed, group, element index in its group, step): no owner or world size in it.
TEST_CASE("muon checkpoint: reshard, all-bf16 with stochastic rounding and bf16 GEMMs") {
  for (const reshard& r : {reshard{4, 1, 2, 2}, reshard{1, 0, 3, 2}, reshard{2, 2, 1, 1}})
    check_reshard<mpopt::bf16_stochastic_policy, mpopt::no_scaler, mpopt::muon_gemm<mpopt::bf16_t>>(r, "bf16_sr");
}

// The compensation is per element, saved and read with its tensor's master by the same owners.
using kahan_policy = mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<mpopt::bf16_t, mpopt::kahan_summation>,
                                      mpopt::grad<mpopt::bf16_t>, mpopt::state<float>>;

TEST_CASE("muon checkpoint: reshard of a Kahan master, its compensation included") {
  for (const reshard& r : {reshard{2, 1, 1, 0}, reshard{2, 0, 3, 2}, reshard{2, 2, 3, 1}, reshard{3, 2, 2, 1},
                           reshard{1, 0, 2, 2}, reshard{2, 2, 2, 0}})
    check_reshard<kahan_policy, mpopt::no_scaler>(r, "kahan");
  for (const reshard& r : {reshard{2, 1, 3, 2}, reshard{2, 2, 1, 1}})
    check_reshard<mpopt::bf16_kahan_policy, mpopt::dynamic_scaler, mpopt::muon_gemm<mpopt::bf16_t>>(r, "kahan_bf16");
}

// load_options::convert_master_rounding at another world size: each weight master + compensation, into an fp32
// master (so the compensation shows).
TEST_CASE("muon checkpoint: a Kahan checkpoint of 2 ranks folds into an fp32 master on the others") {
  if (world_size() < 2) return;
  using K = mpopt::muon_optimizer<kahan_policy>;
  using W = mpopt::muon_optimizer<mpopt::bf16_mixed_policy>;
  const std::string dir = shared_dir("kahan_fold");
  // Rank 0's snapshot at the save, sent to every rank.
  std::vector<std::size_t> sizes;
  for (const auto& shapes : kMatrices) {
    sizes.push_back(0);
    for (const matrix_shape& sh : shapes) sizes.back() += sh.rows * sh.cols;
  }
  for (const auto& tensors : kAux) {
    sizes.push_back(0);
    for (std::size_t n : tensors) sizes.back() += n;
  }
  snapshot<K> saved;
  {
    sub_comm sc(2);
    if (sc.member()) {
      mpopt::comm::mpi comm(sc.c);
      mpopt::zero_options z;
      z.stage = 2;
      model<kahan_policy> m(1, 1.0);
      K o(m.matrices, m.aux, comm, z);
      for (int k = 0; k < kSaveAfter; ++k) {
        m.make_grads(k, false, 1.0);
        o.step();
      }
      ck::save(o, dir);
      saved = take_muon(o);
    }
  }
  saved.master.resize(sizes.size());
  saved.compensation.resize(sizes.size());
  for (std::size_t g = 0; g < sizes.size(); ++g) {
    saved.master[g].resize(sizes[g]);
    saved.compensation[g].resize(sizes[g]);
    MPI_Bcast(saved.master[g].data(), int(sizes[g] * 2), MPI_BYTE, 0, MPI_COMM_WORLD);
    MPI_Bcast(saved.compensation[g].data(), int(sizes[g] * 2), MPI_BYTE, 0, MPI_COMM_WORLD);
  }

  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 1;
  model<mpopt::bf16_mixed_policy> m(2, 3.0);
  W o(m.matrices, m.aux, comm, z);
  ck::load_options lo;
  lo.convert_dtypes = true;  // bf16 master -> fp32
  ckpt_test::check_error(ckpt_test::error_of([&] { ck::load(o, dir, lo); }),
                         {"\"precision.master_rounding\": checkpoint has \"kahan\", this optimizer has \"nearest\"",
                          "set load_options::convert_master_rounding"});
  lo.convert_master_rounding = true;
  ck::load(o, dir, lo);
  const snapshot<W> got = take_muon(o);
  std::size_t moved = 0, total = 0;
  for (std::size_t g = 0; g < sizes.size(); ++g)
    for (std::size_t i = 0; i < sizes[g]; ++i, ++total) {
      const float want = ckpt_test::kahan_weight_ref(saved.master[g][i], saved.compensation[g][i]);
      REQUIRE(got.master[g][i] == want);
      moved += want != float(saved.master[g][i]);
    }
  CHECK(moved > total / 2);  // the compensation was not lost
  shared_dir.remove();
}

TEST_CASE("muon checkpoint: a rank's bad file fails the load on every rank, and nothing changes") {
  if (world_size() < 2) return;
  using O = mpopt::muon_optimizer<mpopt::fp32_policy>;
  const std::string dir = shared_dir("bad_file");
  mpopt::comm::mpi comm;
  mpopt::zero_options z;
  z.stage = 1;
  model<mpopt::fp32_policy> m(1, 1.0);
  O o(m.matrices, m.aux, comm, z);
  m.make_grads(0, false, 1.0);
  o.step();
  ck::save(o, dir);
  ckpt_test::truncate_rank0_file(dir);
  model<mpopt::fp32_policy> m2(2, 1.0);
  O fresh(m2.matrices, m2.aux, comm, z);
  const snapshot<O> before = take_muon(fresh);
  const model<mpopt::fp32_policy> params_before = m2;
  ckpt_test::check_rank0_truncated(ckpt_test::error_of([&] { ck::load(fresh, dir); }));
  CHECK(diff(before, take_muon(fresh)).empty());
  CHECK(same_groups(m2.mp, params_before.mp));
  CHECK(same_groups(m2.ap, params_before.ap));
  shared_dir.remove();
}
