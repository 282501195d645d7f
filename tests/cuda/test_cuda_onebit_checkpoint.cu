// Checkpoints of mpopt::cuda::onebit::optimizer (checkpoint/cuda_onebit.cuh), at one GPU and at 2-3 ranks (threads on
// one GPU, threaded_comm.cuh): N steps into the compressed (1-bit Adam, 1-bit LAMB) or local-step (0/1 Adam) phase,
// save, M more steps, against a fresh optimizer that loads and takes the same M steps: every buffer (params, master,
// states, error feedback, sync point), the step, the lr sum, 1-bit LAMB's per-tensor coefficients and the scaler state
// the same bits. The host 1-bit optimizer loads the same files and takes the same steps with the same bits (the test
// builds with --fmad=false, as the host does without contraction), 1-bit LAMB's per-tensor doubles aside (summed in
// another order on the device: test_cuda_onebit.cu). Loaded at another world size the error buffers are zeroed; a
// checkpoint of another shape is refused and the device state is unchanged.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "mpopt/checkpoint/cuda_onebit.cuh"
#include "onebit_support.cuh"
#include "test_cuda_support.cuh"
#include "threaded_comm.cuh"

namespace {

using namespace mpopt_test;
using scaler = mpopt::dynamic_scaler;
using prec = fp16_mixed;
using param_t = prec::param_t;
using grad_t = prec::grad_t;

constexpr int steps_before = 8;  // past freeze_step and var_freeze_step: the error buffers are in use
constexpr int steps_after = 6;
constexpr int overflow_step = steps_before + 3;  // 1-based; planted on the last rank
const std::size_t sizes[] = {1000, 37};
const std::vector<std::size_t> tensor_sizes[] = {{600, 0, 3, 397}, {}};  // 1-bit LAMB's per-tensor state

scaler::args scaler_args() {
  scaler::args s;
  s.init_scale = 1024.0f;
  return s;
}

std::vector<grad_t> grads_of(std::size_t g, int rank, int world, int k) {
  rng r(std::uint64_t(1000 * k + 10 * rank + g));
  std::vector<grad_t> v(sizes[g]);
  for (grad_t& x : v) x = mpopt::convert<grad_t>(r.signed_value() * 1024.0f);
  if (k == overflow_step && g == 0 && rank == world - 1) v[3] = mpopt::convert<grad_t>(INFINITY);
  return v;
}

std::vector<std::uint8_t> momentum_mask() {
  std::vector<std::uint8_t> m(sizes[1]);
  for (std::size_t i = 0; i < m.size(); ++i) m[i] = i % 3 == 0 ? 0 : 1;
  return m;
}

// Every buffer and scalar of one rank's optimizer, as raw bytes by name.
using snapshot = std::map<std::string, std::vector<unsigned char>>;

template <class T>
std::vector<unsigned char> raw(const T* p, std::size_t n) {
  std::vector<unsigned char> b(n * sizeof(T));
  if (n > 0) std::memcpy(b.data(), p, b.size());
  return b;
}
template <class T>
std::vector<unsigned char> raw_device(const T* p, std::size_t n) {
  const std::vector<T> v = to_host(p, n);
  return raw(v.data(), n);
}
template <class T>
std::vector<unsigned char> raw_value(const T& v) {
  return raw(&v, 1);
}

// The names whose bytes differ (or exist on one side only); empty when the snapshots are equal.
std::string differences(const snapshot& a, const snapshot& b) {
  std::string out;
  for (const auto& [name, bytes] : a) {
    const auto it = b.find(name);
    if (it == b.end() || it->second != bytes) out += name + "; ";
  }
  for (const auto& [name, bytes] : b)
    if (a.count(name) == 0) out += name + " (one side only); ";
  return out;
}

// 1-bit LAMB's per-tensor coefficients of a group (doubles): compared between CUDA runs only.
const std::string lamb_key = "lamb tensors of group ";

snapshot without_lamb_doubles(snapshot s) {
  for (auto it = s.begin(); it != s.end();) it = it->first.rfind(lamb_key, 0) == 0 ? s.erase(it) : std::next(it);
  return s;
}

// One rank's model and CUDA optimizer.
template <class Rule>
struct device_rank {
  using opt_type = mpopt::cuda::onebit::optimizer<Rule, prec, scaler>;
  mpopt::comm::communicator* comm;
  cudaStream_t stream;
  int rank, world;
  std::vector<device_buffer<param_t>> params;
  std::vector<device_buffer<grad_t>> grads;
  std::optional<opt_type> opt;

  // `init` offsets the initial params, so that a loading optimizer starts elsewhere than the saved one.
  device_rank(mpopt::comm::communicator* c, cudaStream_t s, int r, int w, float init)
      : comm(c), stream(s), rank(r), world(w) {
    std::vector<mpopt::param_group<Rule, prec>> groups;
    for (std::size_t g = 0; g < 2; ++g) {
      rng gen(77 + g);
      std::vector<param_t> p(sizes[g]);
      for (param_t& x : p) x = mpopt::convert<param_t>(gen.signed_value() + init);
      params.push_back(to_device(p));
      grads.push_back(to_device(std::vector<grad_t>(sizes[g])));
      mpopt::param_group<Rule, prec> spec;
      spec.params = params.back().get();
      spec.grads = grads.back().get();
      spec.size = sizes[g];
      spec.tensor_sizes = tensor_sizes[g];
      spec.hparams = onebit_hparams<Rule>();
      groups.push_back(spec);
    }
    if (comm != nullptr) {
      opt.emplace(groups, *comm, scaler_args(), mpopt::step_options{}, mpopt::onebit::options{}, stream);
    } else {
      opt.emplace(groups, scaler_args(), mpopt::step_options{}, mpopt::onebit::options{}, stream);
    }
    const std::vector<std::uint8_t> mask = momentum_mask();
    opt->set_momentum_mask(1, mask.data(), mask.size(), stream);
  }

  void steps(int first, int last) {
    for (int k = first; k <= last; ++k) {
      for (std::size_t g = 0; g < 2; ++g) {
        const std::vector<grad_t> v = grads_of(g, rank, world, k);
        copy_to(grads[g].get(), v.data(), v.size());
      }
      opt->step(stream);
      const mpopt::step_result r = opt->result(stream);
      if (!r.error.ok()) throw std::runtime_error("step " + std::to_string(k) + ": " + r.error.message);
    }
  }

  snapshot state() {
    snapshot s;
    for (std::size_t g = 0; g < 2; ++g) {
      const std::string k = "group " + std::to_string(g) + " ";
      s[k + "params"] = raw_device(params[g].get(), sizes[g]);
      s[k + "master"] = raw_device(opt->master(g), sizes[g]);
      for (int j = 0; j < Rule::max_states; ++j)
        s[k + "state " + std::to_string(j)] = raw_device(opt->state(g, j), sizes[g]);
      if constexpr (std::is_same_v<Rule, mpopt::onebit_lamb>) {
        const auto t = opt->lamb_state(g, stream);
        s[lamb_key + std::to_string(g)] = raw(t.data(), t.size());
      }
      if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
        s[k + "sync point"] = raw_device(opt->sync_point(g), sizes[g]);
        s[k + "accumulated lr"] = raw_value(opt->accumulated_lr(g));
      }
    }
    for (std::size_t i = 0; i < opt->num_error_buffers(); ++i) {
      const auto& e = opt->errors(i);
      s["errors " + std::to_string(i) + " worker"] = raw_device(e.worker.get(), e.worker.size());
      s["errors " + std::to_string(i) + " server"] = raw_device(e.server.get(), e.server.size());
    }
    s["step"] = raw_value(opt->step_count());
    s["scaler"] = raw_value(opt->scaler_state(stream));
    return s;
  }
};

// The host 1-bit optimizer with the same model, talking through the same device communicator.
template <class Rule>
struct host_rank {
  using opt_type = mpopt::onebit::optimizer<Rule, prec, scaler>;
  int rank, world;
  std::vector<std::vector<param_t>> params;
  std::vector<std::vector<grad_t>> grads;
  std::optional<mpopt::checkpoint::detail::staged_host_comm> staged;
  std::optional<opt_type> opt;

  host_rank(mpopt::comm::communicator* comm, int r, int w) : rank(r), world(w) {
    std::vector<mpopt::param_group<Rule, prec>> groups;
    for (std::size_t g = 0; g < 2; ++g) {
      params.emplace_back(sizes[g]);
      grads.emplace_back(sizes[g]);
    }
    for (std::size_t g = 0; g < 2; ++g) {
      mpopt::param_group<Rule, prec> spec;
      spec.params = params[g].data();
      spec.grads = grads[g].data();
      spec.size = sizes[g];
      spec.tensor_sizes = tensor_sizes[g];
      spec.hparams = onebit_hparams<Rule>();
      groups.push_back(spec);
    }
    if (comm != nullptr) {
      staged.emplace(*comm);
      opt.emplace(groups, *staged, scaler_args());
    } else {
      opt.emplace(groups, scaler_args());
    }
    const std::vector<std::uint8_t> mask = momentum_mask();
    opt->set_momentum_mask(1, mask.data(), mask.size());
  }

  void steps(int first, int last) {
    for (int k = first; k <= last; ++k) {
      for (std::size_t g = 0; g < 2; ++g) grads[g] = grads_of(g, rank, world, k);
      const mpopt::step_result r = opt->step();
      if (!r.error.ok()) throw std::runtime_error("host step " + std::to_string(k) + ": " + r.error.message);
    }
  }

  snapshot state() const {
    snapshot s;
    for (std::size_t g = 0; g < 2; ++g) {
      const std::string k = "group " + std::to_string(g) + " ";
      s[k + "params"] = raw(params[g].data(), sizes[g]);
      s[k + "master"] = raw(opt->master(g), sizes[g]);
      for (int j = 0; j < Rule::max_states; ++j) s[k + "state " + std::to_string(j)] = raw(opt->state(g, j), sizes[g]);
      if constexpr (std::is_same_v<Rule, mpopt::zero_one_adam>) {
        s[k + "sync point"] = raw(opt->sync_point(g), sizes[g]);
        s[k + "accumulated lr"] = raw_value(opt->accumulated_lr(g));
      }
    }
    for (std::size_t i = 0; i < opt->num_error_buffers(); ++i) {
      const auto& e = opt->errors(i);
      s["errors " + std::to_string(i) + " worker"] = raw(e.worker.data(), e.worker.size());
      s["errors " + std::to_string(i) + " server"] = raw(e.server.data(), e.server.size());
    }
    s["step"] = raw_value(opt->step_count());
    s["scaler"] = raw_value(opt->scaler_state());
    return s;
  }
};

std::string scratch(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("mpopt_cuda_onebit_ckpt_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// One rank of the resume check; what differed, or empty.
template <class Rule>
std::string resume_rank(mpopt::comm::communicator* comm, cudaStream_t stream, int rank, int world,
                        const std::string& dir) {
  std::string failures;
  device_rank<Rule> saved(comm, stream, rank, world, 0.0f);
  saved.steps(1, steps_before);
  mpopt::checkpoint::save(*saved.opt, dir, {}, stream);
  saved.steps(steps_before + 1, steps_before + steps_after);
  const snapshot expected = saved.state();

  device_rank<Rule> loaded(comm, stream, rank, world, 0.5f);
  const mpopt::checkpoint::onebit_load_result r = mpopt::checkpoint::load(*loaded.opt, dir, {}, stream);
  if (!r.errors_restored || r.saved_world_size != world || r.step != steps_before)
    failures += "load result (errors_restored " + std::to_string(r.errors_restored) + ", saved_world_size " +
                std::to_string(r.saved_world_size) + ", step " + std::to_string(r.step) + "); ";
  loaded.steps(steps_before + 1, steps_before + steps_after);
  const std::string device_diff = differences(expected, loaded.state());
  if (!device_diff.empty()) failures += "CUDA resume differs: " + device_diff;

  host_rank<Rule> host(comm, rank, world);
  (void)mpopt::checkpoint::load(*host.opt, dir);
  host.steps(steps_before + 1, steps_before + steps_after);
  const std::string host_diff = differences(without_lamb_doubles(expected), host.state());
  if (!host_diff.empty()) failures += "host resume differs: " + host_diff;
  return failures;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda 1-bit optimizers: save, load, continue gives the same bits, on the GPU and on the host", Rule,
                   mpopt::onebit_adam, mpopt::zero_one_adam, mpopt::onebit_lamb) {
  const std::string name = std::is_same_v<Rule, mpopt::zero_one_adam> ? "zero_one"
                           : std::is_same_v<Rule, mpopt::onebit_lamb> ? "onebit_lamb"
                                                                      : "onebit";
  {
    INFO("one GPU, no communicator");
    CHECK(resume_rank<Rule>(nullptr, nullptr, 0, 1, scratch(name + "_1")) == "");
  }
  for (int world = 2; world <= 3; ++world) {
    const std::string dir = scratch(name + "_" + std::to_string(world));
    std::vector<std::string> failures(static_cast<std::size_t>(world));
    run_ranks(world, [&](int rank, threaded_device_comm& comm) {
      failures[std::size_t(rank)] = resume_rank<Rule>(&comm, comm.stream(), rank, world, dir);
    });
    for (int rank = 0; rank < world; ++rank) {
      INFO("world ", world, ", rank ", rank);
      CHECK(failures[std::size_t(rank)] == "");
    }
  }
}

TEST_CASE("cuda 1-bit Adam: a checkpoint of 2 ranks loads on one GPU with the error buffers zeroed") {
  using Rule = mpopt::onebit_adam;
  const std::string dir = scratch("reshard");
  std::vector<snapshot> at_save(2);
  run_ranks(2, [&](int rank, threaded_device_comm& comm) {
    device_rank<Rule> r(&comm, comm.stream(), rank, 2, 0.0f);
    r.steps(1, steps_before);
    mpopt::checkpoint::save(*r.opt, dir, {}, comm.stream());
    at_save[std::size_t(rank)] = r.state();
  });
  // The error buffers were in use at 2 ranks: zeroing them is a change.
  const std::vector<unsigned char> zeros(at_save[0].at("errors 0 worker").size(), 0);
  REQUIRE(at_save[0].at("errors 0 worker") != zeros);

  device_rank<Rule> one(nullptr, nullptr, 0, 1, 0.5f);
  const mpopt::checkpoint::onebit_load_result r = mpopt::checkpoint::load(*one.opt, dir);
  CHECK_FALSE(r.errors_restored);
  CHECK(r.saved_world_size == 2);
  const snapshot s = one.state();
  for (const char* name :
       {"group 0 master", "group 0 state 0", "group 0 state 1", "group 1 master", "step", "scaler"}) {
    INFO(name);
    CHECK(s.at(name) == at_save[0].at(name));
  }
  for (const char* name : {"errors 0 worker", "errors 0 server", "errors 1 worker"}) {
    INFO(name);
    const std::vector<unsigned char>& b = s.at(name);
    CHECK(b == std::vector<unsigned char>(b.size(), 0));
  }
}

TEST_CASE("cuda 1-bit Adam: a checkpoint of another shape is refused and the device state is unchanged") {
  using Rule = mpopt::onebit_adam;
  const std::string dir = scratch("shape");
  {  // a one-group optimizer's checkpoint
    device_buffer<param_t> p = to_device(std::vector<param_t>(64, mpopt::convert<param_t>(0.25f)));
    device_buffer<grad_t> gr = to_device(std::vector<grad_t>(64, mpopt::convert<grad_t>(1.0f)));
    mpopt::param_group<Rule, prec> spec;
    spec.params = p.get();
    spec.grads = gr.get();
    spec.size = 64;
    mpopt::cuda::onebit::optimizer<Rule, prec, scaler> other({spec}, scaler_args());
    other.step(nullptr);
    mpopt::checkpoint::save(other, dir);
  }
  device_rank<Rule> r(nullptr, nullptr, 0, 1, 0.0f);
  r.steps(1, 3);
  const snapshot before = r.state();
  CHECK_THROWS_WITH_AS(mpopt::checkpoint::load(*r.opt, dir), doctest::Contains("groups"), mpopt::error);
  CHECK(differences(before, r.state()) == "");
}
