// mpopt::cuda::optimizer with ZeRO over a real NCCL communicator at world size 1 (NCCL allows one rank per GPU; the
// sharded world sizes run in test_cuda_zero.cu, as threads over one GPU): stages 0-3 through ncclReduceScatter,
// ncclAllGather and the statistics gather reproduce the optimizer without ZeRO bit for bit, and a whole ZeRO step
// captured in a CUDA graph replays as uncaptured steps do.
#include <vector>

#include "nccl_support.cuh"
#include "zero_support.cuh"

using namespace mpopt_test;

TEST_CASE("ZeRO stages 0-3 over NCCL at one rank reproduce the optimizer without ZeRO bit for bit") {
  zero_setup<mpopt::adamw, bf16_mixed, mpopt::dynamic_scaler> s;
  s.hparams.lr = 1e-2f;
  s.hparams.weight_decay = 0.1f;
  s.grad_scale = 65536.0f;
  const zero_trajectory<bf16_mixed> ref = reference_run(s);
  nccl_world_of_one w;
  for (int stage = 0; stage <= 3; ++stage) {
    INFO("stage ", stage);
    check_same_trajectory(s, s.run(w.comm.get(), w.stream, stage, 0, 1), ref);
  }
}

TEST_CASE("a ZeRO-2 step over NCCL captured in a CUDA graph replays as uncaptured steps") {
  using opt_t = mpopt::cuda::optimizer<mpopt::adamw, bf16_mixed>;
  nccl_world_of_one w;
  const std::size_t n = 20000;
  const std::vector<bf16_t> p0 = seeded_values<bf16_t>(n, 7, 1.0f);
  device_buffer<bf16_t> pa = to_device(p0), pb = to_device(p0), grads(n, "grads");
  mpopt::zero_options z;
  z.stage = 2;
  z.bucket_elements = 6000;
  mpopt::adamw::args a;
  a.lr = 1e-2f;
  opt_t direct({{pa.get(), grads.get(), n, {}, a}}, *w.comm, z, {}, {}, w.stream);
  opt_t captured({{pb.get(), grads.get(), n, {}, a}}, *w.comm, z, {}, {}, w.stream);

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MPOPT_CUDA_REQUIRE(cudaStreamBeginCapture(w.stream, cudaStreamCaptureModeThreadLocal));
  captured.step(w.stream);
  MPOPT_CUDA_REQUIRE(cudaStreamEndCapture(w.stream, &graph));
  REQUIRE(captured.last_error().ok());
  MPOPT_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
  for (int step = 0; step < 5; ++step) {
    const std::vector<bf16_t> g = seeded_values<bf16_t>(n, 100 + std::uint64_t(step), 1.0f);
    MPOPT_CUDA_REQUIRE(cudaMemcpy(grads.get(), g.data(), n * sizeof(bf16_t), cudaMemcpyHostToDevice));
    direct.step(w.stream);
    MPOPT_CUDA_REQUIRE(cudaGraphLaunch(exec, w.stream));
    MPOPT_CUDA_REQUIRE(cudaStreamSynchronize(w.stream));
    INFO("step ", step);
    CHECK_SAME_BITS(to_host(pb.get(), n), to_host(pa.get(), n), "params");
    CHECK(captured.result(w.stream).step == step + 1);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
