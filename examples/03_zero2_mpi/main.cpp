// Example 03: data-parallel training with ZeRO stage 2 over MPI (run it with mpirun -np 2, or any rank count).
//
// Every rank holds the whole model (bf16 params) and computes grads on its own part of the data. With ZeRO-2 the
// fp32 master weights, the AdamW states and the reduced grads are sharded: step() reduce-scatters the grads (mean
// over ranks), each rank updates its shard, and the updated params are all-gathered into every rank's params. The
// result equals single-rank training on the union of the data, with 1/W of the optimizer memory per rank.
#include <cstdio>
#include <random>
#include <vector>

#include <mpopt/comm/mpi.hpp>
#include <mpopt/numeric/convert.hpp>
#include <mpopt/optimizer.hpp>
#include <mpopt/rule/adam.hpp>

// y = X w_true + noise; every rank draws its own 128 samples of the same w_true.
struct problem {
  int n = 128, d = 64;
  std::vector<float> x, y;
};

problem make_problem(int rank) {
  problem p;
  std::mt19937 teacher(1), rng(100u + unsigned(rank));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> w_true(std::size_t(p.d));
  for (float& v : w_true) v = normal(teacher);
  for (int i = 0; i < p.n; ++i) {
    float t = 0.01f * normal(rng);
    for (int k = 0; k < p.d; ++k) {
      p.x.push_back(normal(rng));
      t += p.x.back() * w_true[std::size_t(k)];
    }
    p.y.push_back(t);
  }
  return p;
}

// Mean squared error / 2 on this rank's data, the gradient rounded into bf16 grads.
float loss_and_grad(const problem& p, const mpopt::bf16_t* w, mpopt::bf16_t* grad) {
  std::vector<float> wf(std::size_t(p.d)), gf(std::size_t(p.d), 0.f);
  for (int k = 0; k < p.d; ++k) wf[std::size_t(k)] = float(w[k]);
  double loss = 0;
  for (int i = 0; i < p.n; ++i) {
    const float* xi = &p.x[std::size_t(i) * p.d];
    float e = -p.y[std::size_t(i)];
    for (int k = 0; k < p.d; ++k) e += xi[k] * wf[std::size_t(k)];
    loss += 0.5 * double(e) * e / p.n;
    for (int k = 0; k < p.d; ++k) gf[std::size_t(k)] += e * xi[k] / float(p.n);
  }
  for (int k = 0; k < p.d; ++k) grad[k] = mpopt::convert<mpopt::bf16_t>(gf[std::size_t(k)]);
  return float(loss);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);  // the caller owns MPI; mpopt::comm::mpi duplicates the communicator it is given
  int status = 1;
  {
    mpopt::comm::mpi comm(MPI_COMM_WORLD);
    const problem p = make_problem(comm.rank());
    std::vector<mpopt::bf16_t> w(std::size_t(p.d), mpopt::bf16_t(0.f)), g(std::size_t(p.d));

    mpopt::param_group<mpopt::adamw, mpopt::bf16_mixed_policy> group;
    group.params = w.data();
    group.grads = g.data();
    group.size = w.size();
    group.hparams.lr = 0.02;
    group.hparams.weight_decay = 0.0;

    mpopt::zero_options zero;
    zero.stage = 2;  // shard master, states and grads
    mpopt::step_options options;
    options.max_grad_norm = 1.0;  // the norm is global: every rank clips alike
    // Collective: every rank constructs with the same layout.
    mpopt::optimizer<mpopt::adamw, mpopt::bf16_mixed_policy> opt({group}, comm, zero, {}, options);

    auto global_loss = [&] {
      double l = loss_and_grad(p, w.data(), g.data());
      MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
      return l / comm.size();
    };
    for (int step = 0; step < 400; ++step) {
      const double loss = global_loss();  // also this rank's grads
      opt.step();                         // reduce-scatter, update the shard, all-gather the params
      if (comm.rank() == 0 && step % 100 == 0) std::printf("step %3d  mean loss over ranks %.6f\n", step, loss);
    }
    const double loss = global_loss();

    // Every rank must end with the same params.
    std::vector<float> mine(w.size()), first(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) mine[i] = first[i] = float(w[i]);
    MPI_Bcast(first.data(), int(first.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    int differ = mine != first;
    MPI_Allreduce(MPI_IN_PLACE, &differ, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);

    const mpopt::zero::range shard = opt.local_range(0);  // the elements whose master and states this rank holds
    const bool ok = loss < 2e-3 && !differ;
    if (comm.rank() == 0) {
      std::printf("ranks %d, ZeRO stage %d: rank 0 holds the master and states of elements [%zu, %zu) of %zu\n",
                  comm.size(), zero.stage, shard.begin, shard.end, w.size());
      std::printf("%s: final mean loss %.6f (%s 2e-3), params %s on every rank\n", ok ? "PASS" : "FAIL", loss,
                  loss < 2e-3 ? "<" : ">=", differ ? "DIFFER" : "identical");
    }
    status = ok ? 0 : 1;
  }
  MPI_Finalize();
  return status;
}
