// mpopt::cuda::optimizer with ZeRO stages 0-3 at world sizes 1-4, every rank a host thread on one GPU
// (threaded_comm.cuh), against the same optimizer without ZeRO on one rank.
//
// Every rank feeds the same global grads, so their mean is the grads themselves (reduced in fp32, or fp64 for fp32
// grads: W equal values add exactly and divide back exactly); an overflow step plants an inf on one rank only, which
// must skip the step on every rank. The update kernels are the single-rank ones with shard offsets, and without
// clipping the statistics decide only the overflow skip, so params, master, states and step results must match the
// single-rank run bit for bit. With clipping the sum of squares is added in another order (per-shard partials): the
// norm and the params are then compared within a bound.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "threaded_comm.cuh"
#include "zero_support.cuh"

namespace {

using namespace mpopt_test;

// Every rank at (world, stage) against the reference, bit for bit.
template <class Rule, class Prec, class Scaler>
void check_bitwise(const zero_setup<Rule, Prec, Scaler>& s, const zero_trajectory<Prec>& ref, int world, int stage) {
  std::vector<zero_trajectory<Prec>> runs(static_cast<std::size_t>(world));
  run_ranks(world, [&](int rank, threaded_device_comm& comm) {
    runs[std::size_t(rank)] = s.run(&comm, comm.stream(), stage, rank, world);
  });
  for (int rank = 0; rank < world; ++rank) {
    INFO("world ", world, ", stage ", stage, ", rank ", rank);
    check_same_trajectory(s, runs[std::size_t(rank)], ref);
  }
}

template <class Rule, class Prec, class Scaler>
void check_all_worlds(const zero_setup<Rule, Prec, Scaler>& s, int max_stage = 3) {
  const zero_trajectory<Prec> ref = reference_run(s);
  int applied = 0;
  for (const auto& r : ref.results) applied += r.applied ? 1 : 0;
  CHECK(applied == (Scaler::skips_on_overflow(s.scaler) ? num_steps - 1 : num_steps));
  for (int world = 1; world <= 4; ++world)
    for (int stage = 0; stage <= max_stage; ++stage) check_bitwise(s, ref, world, stage);
}

using bf16_sr = bf16_master_fp32_states<mpopt::stochastic_rounding>;

}  // namespace

TEST_CASE_TEMPLATE("cuda ZeRO stages 0-3 at 1-4 ranks reproduce one rank bit for bit (adamw)", Prec, fp32, bf16_mixed,
                   bf16_sr, mpopt::bf16_kahan_policy) {
  zero_setup<mpopt::adamw, Prec, mpopt::no_scaler> s;
  s.hparams.lr = 1e-2f;
  s.hparams.weight_decay = 0.1f;
  check_all_worlds(s);
}

TEST_CASE("cuda ZeRO with fp16 dynamic loss scaling: an inf on one rank skips the step on every rank") {
  zero_setup<mpopt::adamw, fp16_mixed, mpopt::dynamic_scaler> s;
  s.hparams.lr = 1e-3f;
  s.grad_scale = 65536.0f;
  check_all_worlds(s);
}

TEST_CASE_TEMPLATE("cuda ZeRO lamb: stages 0-3 at 1-4 ranks reproduce one rank bit for bit (segment sums gathered)",
                   Prec, fp32, bf16_mixed) {
  // Tensors straddle shards and some shards are empty: each rank sums its segments, the sums are all-gathered, and
  // every rank adds each tensor's segments in the single-rank order.
  zero_setup<mpopt::lamb, Prec, mpopt::no_scaler> s;
  s.hparams.lr = 1e-2f;
  s.hparams.weight_decay = 0.01f;
  check_all_worlds(s);
}

TEST_CASE("cuda ZeRO with clipping: the same norm and params within a bound") {
  zero_setup<mpopt::adamw, fp32, mpopt::no_scaler> s;
  s.hparams.lr = 1e-2f;
  s.options.max_grad_norm = 0.5;  // the grads' norm is about 30: every step clips
  const zero_trajectory<fp32> ref = reference_run(s);
  for (const auto& r : ref.results) CHECK(r.clip_coef < 0.1);
  for (int world : {2, 3}) {
    for (int stage : {1, 3}) {
      std::vector<zero_trajectory<fp32>> runs(static_cast<std::size_t>(world));
      run_ranks(world, [&](int rank, threaded_device_comm& comm) {
        runs[std::size_t(rank)] = s.run(&comm, comm.stream(), stage, rank, world);
      });
      for (int step = 0; step < num_steps; ++step) {
        INFO("world ", world, ", stage ", stage, ", step ", step);
        const mpopt::step_result& b = ref.results[std::size_t(step)];
        for (const zero_trajectory<fp32>& t : runs) {
          const mpopt::step_result& a = t.results[std::size_t(step)];
          // The partials of one rank are added in another order: the double sum moves by a few ulps at most.
          CHECK(std::fabs(a.grad_norm - b.grad_norm) <= 1e-12 * b.grad_norm);
          CHECK(std::fabs(a.clip_coef - b.clip_coef) <= 1e-6 * b.clip_coef);
          for (std::size_t g = 0; g < s.shape.sizes.size(); ++g) {
            const auto &p = t.params[std::size_t(step)][g], &q = ref.params[std::size_t(step)][g];
            std::size_t bad = 0;
            for (std::size_t i = 0; i < p.size(); ++i)
              bad += std::fabs(p[i] - q[i]) <= 1e-6f + 1e-5f * std::fabs(q[i]) ? 0 : 1;
            CHECK_MESSAGE(bad == 0, "group ", g, ": ", bad, " params outside 1e-6 + 1e-5 |p|");
          }
          // Every rank decided alike.
          CHECK(a.clip_coef == runs[0].results[std::size_t(step)].clip_coef);
        }
      }
    }
  }
}

TEST_CASE("cuda ZeRO checkpoints: save sharded, resume at another world size or stage, bit for bit") {
  zero_setup<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler> s;
  s.hparams.lr = 1e-2f;
  s.hparams.weight_decay = 0.1f;
  const zero_trajectory<mpopt::bf16_kahan_policy> ref = reference_run(s);
  const std::string base = "/tmp/mpopt_test_cuda_zero_ckpt_" + std::to_string(::getpid());
  struct move {
    int world, stage, to_world, to_stage;
  };
  // to_world 0: the optimizer without ZeRO.
  for (const move& m : {move{2, 1, 2, 1}, move{3, 3, 2, 2}, move{4, 2, 0, 0}, move{1, 0, 3, 3}}) {
    INFO("saved at ", m.world, " ranks, stage ", m.stage, "; loaded at ", m.to_world, " ranks, stage ", m.to_stage);
    const std::string dir = base + "_" + std::to_string(m.world) + std::to_string(m.stage);
    std::filesystem::remove_all(dir);
    typename zero_setup<mpopt::adamw, mpopt::bf16_kahan_policy, mpopt::no_scaler>::resume save, load;
    save.save_after = 2;
    save.save_dir = dir;
    load.first_step = 3;
    load.load_dir = dir;
    run_ranks(m.world,
              [&](int rank, threaded_device_comm& comm) { s.run(&comm, comm.stream(), m.stage, rank, m.world, save); });
    if (m.to_world == 0) {
      cudaStream_t stream = nullptr;
      MPOPT_CUDA_REQUIRE(cudaStreamCreate(&stream));
      check_same_trajectory(s, s.run(nullptr, stream, 0, 0, 1, load), ref, load.first_step);
      MPOPT_CUDA_REQUIRE(cudaStreamDestroy(stream));
    } else {
      std::vector<zero_trajectory<mpopt::bf16_kahan_policy>> runs(static_cast<std::size_t>(m.to_world));
      run_ranks(m.to_world, [&](int rank, threaded_device_comm& comm) {
        runs[std::size_t(rank)] = s.run(&comm, comm.stream(), m.to_stage, rank, m.to_world, load);
      });
      for (const auto& t : runs) check_same_trajectory(s, t, ref, load.first_step);
    }
    std::filesystem::remove_all(dir);
  }
}

TEST_CASE("cuda ZeRO: memory per rank follows the ZeRO formulas") {
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, bf16_mixed>;
  const std::size_t n = 4 * 4096 * 3;  // 12 blocks of 4096: no padding at 4 ranks
  for (int stage = 0; stage <= 3; ++stage) {
    std::vector<mpopt::memory_report> reports(4);
    run_ranks(4, [&](int rank, threaded_device_comm& comm) {
      device_buffer<bf16_t> p(n, "params"), g(n, "grads");
      MPOPT_CUDA_REQUIRE(cudaMemset(p.get(), 0, p.bytes()));
      mpopt::zero_options z;
      z.stage = stage;
      opt_t opt({{p.get(), g.get(), n, {}, {}}}, comm, z, {}, {}, comm.stream());
      reports[std::size_t(rank)] = opt.memory();
    });
    const std::size_t shard = stage == 0 ? n : n / 4;
    INFO("stage ", stage);
    for (const mpopt::memory_report& m : reports) {
      CHECK(m.params == (stage == 3 ? n / 4 : n) * 2);
      CHECK(m.grads == (stage >= 2 ? n / 4 : n) * 2);
      CHECK(m.master == shard * 4);      // fp32 master
      CHECK(m.states == 2 * shard * 4);  // two fp32 Adam states: K = 12 with the master, over W at stages 1-3
    }
  }
}

TEST_CASE("cuda ZeRO rejects bad use with a message that names it") {
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, fp32>;
  const std::size_t n = 1000;
  device_buffer<float> p(n, "params"), g(n, "grads");
  MPOPT_CUDA_REQUIRE(cudaMemset(p.get(), 0, p.bytes()));
  MPOPT_CUDA_REQUIRE(cudaMemset(g.get(), 0, g.bytes()));
  const mpopt::param_group<mpopt::adamw, fp32> group{p.get(), g.get(), n, {}, {}};
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const mpopt::error& e) {
      return e.what();
    }
    return "(no error)";
  };

  mpopt::comm::single_rank host_comm;
  CHECK(message([&] { opt_t({group}, host_comm, {}); }).find("needs a device-memory communicator") !=
        std::string::npos);

  run_ranks(1, [&](int, threaded_device_comm& comm) {
    cudaStream_t other = nullptr;
    MPOPT_CUDA_REQUIRE(cudaStreamCreate(&other));
    const std::string wrong_stream = message([&] { opt_t({group}, comm, {}, {}, {}, other); });
    CHECK(wrong_stream.find("is not the communicator's stream") != std::string::npos);
    mpopt::zero_options z;
    z.stage = 1;
    opt_t opt({group}, comm, z, {}, {}, comm.stream());
    CHECK(message([&] { opt.step(other); }).find("step: stream") != std::string::npos);
    CHECK(message([&] {
            opt.reduce_grads(0, 0, 1, g.get(), comm.stream());
          }).find("reduce_grads is for stages 2 and 3") != std::string::npos);
    CHECK(message([&] { opt.gather(0, 0, 1, comm.stream()); }).find("only at ZeRO stage 3") != std::string::npos);
    CHECK(message([&] { opt.prefetch(0, 0, 1); }).find("prefetch: params are sharded only at ZeRO stage 3") !=
          std::string::npos);
    MPOPT_CUDA_REQUIRE(cudaStreamDestroy(other));

    z.stage = 2;
    mpopt::param_group<mpopt::adamw, fp32> no_grads = group;
    no_grads.grads = nullptr;
    opt_t two({no_grads}, comm, z, {}, {}, comm.stream());
    CHECK(message([&] { two.step(comm.stream()); }).find("step: group 0 has no grads") != std::string::npos);
    CHECK(message([&] { two.reduce_grads(0, 0, 2, g.get(), comm.stream()); }).find("out of range") !=
          std::string::npos);

    z.stage = 3;
    z.max_live_elements = n - 1;
    opt_t three({group}, comm, z, {}, {}, comm.stream());
    CHECK(message([&] { three.gather(0, 0, 1, comm.stream()); }).find("max_live_elements = 999") != std::string::npos);
    CHECK_FALSE(three.prefetch(0, 0, 1));  // does not fit: nothing happens
    CHECK(three.live_elements() == 0);
    CHECK(message([&] { three.release(0, 0, 1); }).find("are not gathered") != std::string::npos);
  });

  // Ranks that disagree on the layout all throw.
  std::vector<std::string> messages(2);
  run_ranks(2, [&](int rank, threaded_device_comm& comm) {
    mpopt::param_group<mpopt::adamw, fp32> mine = group;
    mine.size = rank == 0 ? n : n - 1;
    messages[std::size_t(rank)] = message([&] { opt_t({mine}, comm, {}, {}, {}, comm.stream()); });
  });
  for (const std::string& m : messages) CHECK(m.find("ranks disagree on the group layout") != std::string::npos);
}
