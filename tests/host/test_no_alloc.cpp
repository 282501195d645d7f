// A step allocates nothing (issue 7, CPU offload): every buffer and workspace is sized at construction. This file
// replaces the global operator new/delete of the host test binary with counting versions.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include "mpopt/mpopt.hpp"

namespace {
std::atomic<long> allocations{0};
}  // namespace

// GCC 12 cannot see that these new and delete belong together (malloc/free on both sides).
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
// The nothrow forms too (std::stable_sort's temporary buffer uses them): otherwise their memory would come from the
// runtime's operator new and be released by the free() above, which ASan reports as a mismatch.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

namespace {

// Steps `opt` a few times (the first may start OpenMP's thread pool) and returns the allocations of the last steps.
template <class Opt>
long allocations_per_steps(Opt& opt, int steps) {
  opt.step();
  const long before = allocations.load();
  for (int i = 0; i < steps; ++i) opt.step();
  return allocations.load() - before;
}

template <class Rule, class Prec, class Scaler = mpopt::no_scaler>
long count(typename Scaler::args scaler = {}, mpopt::step_options options = {}) {
  const std::size_t n = 100000;  // above the OpenMP threshold
  std::vector<typename Prec::param_t> params(n, mpopt::convert<typename Prec::param_t>(0.25f));
  std::vector<typename Prec::grad_t> grads(n, mpopt::convert<typename Prec::grad_t>(0.5f));
  mpopt::param_group<Rule, Prec> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = n;
  g.tensor_sizes = {1000, 9000, 90000};
  mpopt::optimizer<Rule, Prec, Scaler> opt({g, g}, scaler, options);
  return allocations_per_steps(opt, 3);
}

}  // namespace

TEST_CASE("a host step allocates nothing") {
  mpopt::step_options clip;
  clip.max_grad_norm = 0.5;
  CHECK(count<mpopt::adamw, mpopt::fp32_policy>() == 0);
  CHECK(count<mpopt::adamw, mpopt::bf16_pure_policy>() == 0);
  CHECK(count<mpopt::adamw, mpopt::fp16_mixed_policy, mpopt::dynamic_scaler>(mpopt::dynamic_scale_args{}, clip) == 0);
  CHECK(count<mpopt::lamb, mpopt::bf16_mixed_policy>({}, clip) == 0);
}

TEST_CASE("stage 2's reduce_grads, the pipelined step and grad accumulation allocate nothing") {
  const std::size_t n = 100000;
  std::vector<mpopt::bf16_t> params(n, mpopt::bf16_t(0.25f)), micro(n, mpopt::bf16_t(0.5f));
  using prec =
      mpopt::precision<mpopt::param<mpopt::bf16_t>, mpopt::master<float>, mpopt::grad<float>, mpopt::state<float>>;
  mpopt::grad_accumulator<float> acc(n);
  mpopt::param_group<mpopt::adamw, prec> g;
  g.params = params.data();
  g.grads = acc.data();
  g.size = n;
  g.tensor_sizes = {1000, 9000, 90000};
  mpopt::step_options clip;
  clip.max_grad_norm = 0.5;
  mpopt::comm::single_rank one;
  mpopt::optimizer<mpopt::adamw, prec> stage0({g}, one, {0}, {}, clip), stage2({g}, one, {2}, {}, clip);
  auto none = [](std::size_t, std::size_t, std::size_t) {};
  for (int warm = 0; warm < 2; ++warm) {
    stage2.reduce_grads(0, 0, 3, micro.data());
    stage2.step();
    stage0.step_pipelined(8192, none, none);
  }
  const long before = allocations.load();
  for (int s = 0; s < 3; ++s) {
    acc.reset();
    acc.add(micro.data(), n);
    acc.add(micro.data(), n);
    stage0.step_pipelined(8192, none, none);
    stage2.reduce_grads(0, 1, 3, micro.data() + 1000);
    stage2.reduce_grads(0, 0, 1, micro.data());
    stage2.step();
  }
  CHECK(allocations.load() - before == 0);
}

TEST_CASE("the allocation counter counts") {
  // Construction allocates (group copies, offsets, workspace vectors): the counter must see it.
  const long before = allocations.load();
  std::vector<float> params(10, 1.f), grads(10, 1.f);
  mpopt::param_group<mpopt::adamw, mpopt::fp32_policy> g;
  g.params = params.data();
  g.grads = grads.data();
  g.size = params.size();
  mpopt::optimizer<mpopt::adamw, mpopt::fp32_policy> opt({g});
  CHECK(allocations.load() - before >= 3);
}
