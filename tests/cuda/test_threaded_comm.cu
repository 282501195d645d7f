// The test-only threaded_device_comm (tests/cuda/threaded_comm.cuh) at world sizes 1-4 on one GPU, against
// expectations computed on the host: sums in rank order (16-bit types in float, rounded once), maxima, the layouts of
// reduce_scatter / all_gather / broadcast / the *_bytes collectives, the traffic counters, and the failures that
// must throw rather than hang. Ranks only compute and hand back results; the CHECKs run on the main thread.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "gpu_test.cuh"
#include "mpopt/numeric/convert.hpp"
#include "threaded_comm.cuh"

namespace {

using mpopt::bf16_t;
using mpopt::half_t;
using mpopt_test::reduce_op;
using mpopt_test::run_ranks;
using mpopt_test::threaded_device_comm;
template <class T>
using device_buffer = mpopt::cuda::device_buffer<T>;

// Copies on the rank's stream, waited for: these run inside the rank threads, so they throw instead of REQUIRE.
template <class T>
device_buffer<T> upload(const std::vector<T>& v, cudaStream_t s) {
  device_buffer<T> d(v.size(), "test buffer");
  if (!v.empty())
    mpopt::cuda::throw_if_cuda_error(
        cudaMemcpyAsync(d.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s), "upload");
  mpopt::cuda::throw_if_cuda_error(cudaStreamSynchronize(s), "upload sync");
  return d;
}
template <class T>
std::vector<T> download(const T* p, std::size_t n, cudaStream_t s) {
  std::vector<T> v(n);
  if (n > 0)
    mpopt::cuda::throw_if_cuda_error(cudaMemcpyAsync(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, s),
                                     "download");
  mpopt::cuda::throw_if_cuda_error(cudaStreamSynchronize(s), "download sync");
  return v;
}

// The bits of each element, so that 16-bit types and signed zeros compare exactly.
template <class T>
std::vector<std::uint64_t> raw(const std::vector<T>& v) {
  std::vector<std::uint64_t> out;
  for (const T& x : v) {
    std::uint64_t b = 0;
    std::memcpy(&b, &x, sizeof(T));
    out.push_back(b);
  }
  return out;
}

// Rank r's element i: different on every rank, negative and positive, with low bits that a 16-bit sum rounds off.
template <class T>
T value(int r, std::size_t i) {
  const float v = float(int((i * 37 + std::size_t(r) * 11) % 101) - 50) * 0.0173f + float(r) * 0.311f;
  return mpopt::convert<T>(v);
}
template <class T>
std::vector<T> values(int r, std::size_t n, std::size_t first = 0) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = value<T>(r, first + i);
  return v;
}

// The reduction over ranks 0..w-1 of element i, in rank order, 16-bit types in float, rounded once.
template <class T>
T reduced(int w, std::size_t i, reduce_op op) {
  using A = std::conditional_t<mpopt::is_16bit_v<T>, float, T>;
  A acc = mpopt::convert<A>(value<T>(0, i));
  for (int r = 1; r < w; ++r) {
    const A x = mpopt::convert<A>(value<T>(r, i));
    acc = op == reduce_op::sum ? A(acc + x) : (x > acc ? x : acc);
  }
  return mpopt::convert<T>(acc);
}
template <class T>
std::vector<T> reduced(int w, std::size_t first, std::size_t n, reduce_op op) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = reduced<T>(w, first + i, op);
  return v;
}

// Uneven per-rank counts with zeros, for each world size.
std::vector<std::size_t> uneven_counts(int w) {
  switch (w) {
    case 1: return {37};
    case 2: return {41, 0};
    case 3: return {0, 300, 5};
    default: return {17, 0, 290, 3};
  }
}
std::size_t offset_of(const std::vector<std::size_t>& counts, int r) {
  std::size_t o = 0;
  for (int q = 0; q < r; ++q) o += counts[std::size_t(q)];
  return o;
}
std::size_t total_of(const std::vector<std::size_t>& counts) {
  return offset_of(counts, int(counts.size()));
}

template <class T>
void check_all_reduce(reduce_op op) {
  constexpr std::size_t n = 3001;  // more than one block's worth, not a multiple of anything
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    std::vector<std::vector<T>> out(std::size_t(w), std::vector<T>{});
    run_ranks(w, [&](int r, threaded_device_comm& c) {
      device_buffer<T> d = upload(values<T>(r, n), c.stream());
      c.all_reduce(d.get(), n, op);
      out[std::size_t(r)] = download(d.get(), n, c.stream());
    });
    const auto expected = raw(reduced<T>(w, 0, n, op));
    for (int r = 0; r < w; ++r) {
      CAPTURE(r);
      CHECK(raw(out[std::size_t(r)]) == expected);
    }
  }
}

template <class T>
void check_reduce_scatter(reduce_op op, bool in_place) {
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    for (const auto& counts : {uneven_counts(w), std::vector<std::size_t>(std::size_t(w), 0)}) {
      const std::size_t total = total_of(counts);
      std::vector<std::vector<T>> out(static_cast<std::size_t>(w)), send_after(static_cast<std::size_t>(w));
      run_ranks(w, [&](int r, threaded_device_comm& c) {
        const std::size_t mine = counts[std::size_t(r)], at = offset_of(counts, r);
        device_buffer<T> send = upload(values<T>(r, total), c.stream());
        device_buffer<T> recv = upload(std::vector<T>(mine, mpopt::convert<T>(-99.0f)), c.stream());
        T* target = in_place ? send.get() + at : recv.get();
        c.reduce_scatter(send.get(), target, counts, op);
        out[std::size_t(r)] = download(target, mine, c.stream());
        send_after[std::size_t(r)] = download(send.get(), total, c.stream());
      });
      for (int r = 0; r < w; ++r) {
        CAPTURE(r);
        const std::size_t mine = counts[std::size_t(r)], at = offset_of(counts, r);
        CHECK(raw(out[std::size_t(r)]) == raw(reduced<T>(w, at, mine, op)));
        // The rest of send is left alone (in place, this rank's part is the result).
        std::vector<T> send = values<T>(r, total);
        if (in_place)
          for (std::size_t i = 0; i < mine; ++i) send[at + i] = out[std::size_t(r)][i];
        CHECK(raw(send_after[std::size_t(r)]) == raw(send));
      }
    }
  }
}

template <class T>
void check_all_gather() {
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    const std::vector<std::size_t> counts = uneven_counts(w);
    const std::size_t total = total_of(counts);
    std::vector<T> expected(total);
    for (int r = 0; r < w; ++r)
      for (std::size_t i = 0; i < counts[std::size_t(r)]; ++i)
        expected[offset_of(counts, r) + i] = value<T>(r, offset_of(counts, r) + i);
    std::vector<std::vector<T>> out(static_cast<std::size_t>(w));
    run_ranks(w, [&](int r, threaded_device_comm& c) {
      std::vector<T> mine(total, mpopt::convert<T>(-99.0f));  // only this rank's part is meaningful
      for (std::size_t i = 0; i < counts[std::size_t(r)]; ++i)
        mine[offset_of(counts, r) + i] = expected[offset_of(counts, r) + i];
      device_buffer<T> d = upload(mine, c.stream());
      c.all_gather(d.get(), counts);
      out[std::size_t(r)] = download(d.get(), total, c.stream());
    });
    for (int r = 0; r < w; ++r) {
      CAPTURE(r);
      CHECK(raw(out[std::size_t(r)]) == raw(expected));
    }
  }
}

}  // namespace

TEST_CASE("threaded_device_comm: identity, streams, and W = 1..4 ranks on one device") {
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    std::vector<int> ranks(std::size_t(w), -1), sizes(std::size_t(w), -1), devices(std::size_t(w), -1);
    std::vector<cudaStream_t> streams(std::size_t(w), nullptr);
    std::vector<void*> device_streams(std::size_t(w), nullptr);
    std::vector<std::string> names(static_cast<std::size_t>(w));
    std::vector<char> device_memory(std::size_t(w), 0);  // not vector<bool>: ranks write concurrently
    run_ranks(w, [&](int r, threaded_device_comm& c) {
      const std::size_t i = std::size_t(r);
      ranks[i] = c.rank();
      sizes[i] = c.size();
      streams[i] = c.stream();
      device_streams[i] = c.device_stream();
      names[i] = c.name();
      device_memory[i] = char(c.memory() == mpopt::comm::memory_space::device);
      mpopt::cuda::throw_if_cuda_error(cudaGetDevice(&devices[i]), "cudaGetDevice");
      c.barrier();
    });
    for (int r = 0; r < w; ++r) {
      CAPTURE(r);
      CHECK(ranks[std::size_t(r)] == r);
      CHECK(sizes[std::size_t(r)] == w);
      CHECK(devices[std::size_t(r)] == 0);
      CHECK(names[std::size_t(r)] == "threaded-device");
      CHECK(device_memory[std::size_t(r)] == 1);
      CHECK(streams[std::size_t(r)] != nullptr);
      CHECK(device_streams[std::size_t(r)] == static_cast<void*>(streams[std::size_t(r)]));  // the optimizer's stream
      for (int q = 0; q < r; ++q) CHECK(streams[std::size_t(q)] != streams[std::size_t(r)]);
    }
  }
}

TEST_CASE("threaded_device_comm: all_reduce sums in rank order and takes maxima, every rank the same bits") {
  SUBCASE("fp32 sum") {
    check_all_reduce<float>(reduce_op::sum);
  }
  SUBCASE("fp32 max") {
    check_all_reduce<float>(reduce_op::max);
  }
  SUBCASE("bf16 sum (in float, rounded once)") {
    check_all_reduce<bf16_t>(reduce_op::sum);
  }
  SUBCASE("bf16 max") {
    check_all_reduce<bf16_t>(reduce_op::max);
  }
  SUBCASE("fp16 sum") {
    check_all_reduce<half_t>(reduce_op::sum);
  }
  SUBCASE("fp64 sum") {
    check_all_reduce<double>(reduce_op::sum);
  }
}

TEST_CASE("threaded_device_comm: all_reduce rounds a 16-bit sum once, not per addition") {
  // 1 + 2^-8 + 2^-8 in bf16: rounded after each addition it stays 1 (ties to even); in float, then once, 1 + 2^-7.
  std::vector<std::vector<bf16_t>> out(3);
  run_ranks(3, [&](int r, threaded_device_comm& c) {
    const float v = r == 0 ? 1.0f : 0.00390625f;
    device_buffer<bf16_t> d = upload(std::vector<bf16_t>(4, bf16_t(v)), c.stream());
    c.all_reduce(d.get(), 4, reduce_op::sum);
    out[std::size_t(r)] = download(d.get(), 4, c.stream());
  });
  for (const auto& v : out)
    for (const bf16_t x : v) CHECK(float(x) == 1.0078125f);
}

TEST_CASE("threaded_device_comm: reduce_scatter with uneven and zero counts, disjoint and in place") {
  SUBCASE("fp32 sum, disjoint") {
    check_reduce_scatter<float>(reduce_op::sum, false);
  }
  SUBCASE("fp32 sum, in place") {
    check_reduce_scatter<float>(reduce_op::sum, true);
  }
  SUBCASE("fp32 max, disjoint") {
    check_reduce_scatter<float>(reduce_op::max, false);
  }
  SUBCASE("bf16 sum, in place") {
    check_reduce_scatter<bf16_t>(reduce_op::sum, true);
  }
  SUBCASE("bf16 sum, disjoint") {
    check_reduce_scatter<bf16_t>(reduce_op::sum, false);
  }
}

TEST_CASE("threaded_device_comm: all_gather in place with uneven counts") {
  SUBCASE("fp32") {
    check_all_gather<float>();
  }
  SUBCASE("bf16") {
    check_all_gather<bf16_t>();
  }
  SUBCASE("fp64") {
    check_all_gather<double>();
  }
}

TEST_CASE("threaded_device_comm: broadcast from each root") {
  constexpr std::size_t n = 777;
  for (int w = 1; w <= 4; ++w) {
    for (int root = 0; root < w; ++root) {
      CAPTURE(w);
      CAPTURE(root);
      std::vector<std::vector<float>> out(static_cast<std::size_t>(w));
      run_ranks(w, [&](int r, threaded_device_comm& c) {
        device_buffer<float> d = upload(values<float>(r, n), c.stream());
        c.broadcast(d.get(), n, root);
        c.broadcast(d.get(), 0, root);  // nothing to move, still a valid call
        out[std::size_t(r)] = download(d.get(), n, c.stream());
      });
      for (int r = 0; r < w; ++r) CHECK(raw(out[std::size_t(r)]) == raw(values<float>(root, n)));
    }
  }
}

TEST_CASE("threaded_device_comm: all_gather_bytes and all_to_all_bytes move blocks verbatim") {
  constexpr std::size_t b = 13;  // odd: no alignment assumed
  // Rank r's block j (of either collective): bytes no other (r, j) pair has.
  const auto byte_of = [](int r, int j, std::size_t k) { return std::uint8_t(r * 61 + j * 17 + int(k) * 3 + 1); };
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    const std::size_t total = b * std::size_t(w);
    std::vector<std::vector<std::uint8_t>> gathered(static_cast<std::size_t>(w)),
        exchanged(static_cast<std::size_t>(w));
    run_ranks(w, [&](int r, threaded_device_comm& c) {
      std::vector<std::uint8_t> buf(total, 0xEE), send(total);
      for (std::size_t k = 0; k < b; ++k) buf[std::size_t(r) * b + k] = byte_of(r, r, k);
      for (int j = 0; j < w; ++j)
        for (std::size_t k = 0; k < b; ++k) send[std::size_t(j) * b + k] = byte_of(r, j, k);
      device_buffer<std::uint8_t> dbuf = upload(buf, c.stream()), dsend = upload(send, c.stream());
      device_buffer<std::uint8_t> drecv = upload(std::vector<std::uint8_t>(total, 0xEE), c.stream());
      c.all_gather_bytes(dbuf.get(), b);
      c.all_to_all_bytes(dsend.get(), drecv.get(), b);
      gathered[std::size_t(r)] = download(dbuf.get(), total, c.stream());
      exchanged[std::size_t(r)] = download(drecv.get(), total, c.stream());
    });
    for (int r = 0; r < w; ++r) {
      CAPTURE(r);
      std::vector<std::uint8_t> all(total), mine(total);
      for (int p = 0; p < w; ++p)
        for (std::size_t k = 0; k < b; ++k) {
          all[std::size_t(p) * b + k] = byte_of(p, p, k);
          mine[std::size_t(p) * b + k] = byte_of(p, r, k);  // rank p's block r
        }
      CHECK(gathered[std::size_t(r)] == all);
      CHECK(exchanged[std::size_t(r)] == mine);
    }
  }
}

TEST_CASE("threaded_device_comm: traffic counted as the ring accounting (W-1)/W") {
  constexpr std::size_t n = 1000;
  for (int w = 1; w <= 4; ++w) {
    CAPTURE(w);
    const std::vector<std::size_t> counts = uneven_counts(w);
    const double total = double(total_of(counts));
    std::vector<mpopt::comm::traffic> after_reduce(static_cast<std::size_t>(w)), after_all(static_cast<std::size_t>(w)),
        after_reset(static_cast<std::size_t>(w));
    run_ranks(w, [&](int r, threaded_device_comm& c) {
      device_buffer<float> f = upload(values<float>(r, std::max<std::size_t>(n, total_of(counts))), c.stream());
      device_buffer<bf16_t> h = upload(values<bf16_t>(r, n), c.stream());
      device_buffer<std::uint8_t> bytes = upload(std::vector<std::uint8_t>(8 * std::size_t(w), 0), c.stream());
      device_buffer<std::uint8_t> recv = upload(std::vector<std::uint8_t>(8 * std::size_t(w), 0), c.stream());
      c.all_reduce(f.get(), n, reduce_op::sum);
      after_reduce[std::size_t(r)] = c.traffic_so_far();
      c.all_reduce(h.get(), n, reduce_op::max);
      c.all_gather(f.get(), counts);
      c.broadcast(f.get(), n, w - 1);
      c.all_gather_bytes(bytes.get(), 8);
      c.all_to_all_bytes(bytes.get(), recv.get(), 8);
      c.all_reduce(f.get(), 0, reduce_op::sum);  // counted as a call, moves nothing
      c.barrier();                               // not traffic
      after_all[std::size_t(r)] = c.traffic_so_far();
      c.reset_traffic();
      after_reset[std::size_t(r)] = c.traffic_so_far();
    });
    const double share = double(w - 1) / double(w);
    // all_reduce: 2n; all_gather: the total; broadcast: n; each *_bytes: W blocks of 8 bytes.
    const double elements = (2.0 * n + 2.0 * n + total + n + 8.0 * w + 8.0 * w) * share;
    const double bytes = (2.0 * n * 4 + 2.0 * n * 2 + total * 4 + n * 4 + 8.0 * w + 8.0 * w) * share;
    for (int r = 0; r < w; ++r) {
      CAPTURE(r);
      CHECK(after_reduce[std::size_t(r)].elements == doctest::Approx(2.0 * n * share));
      CHECK(after_reduce[std::size_t(r)].bytes == doctest::Approx(2.0 * n * 4 * share));
      CHECK(after_reduce[std::size_t(r)].calls == 1);
      CHECK(after_all[std::size_t(r)].elements == doctest::Approx(elements));
      CHECK(after_all[std::size_t(r)].bytes == doctest::Approx(bytes));
      CHECK(after_all[std::size_t(r)].calls == 7);
      CHECK(after_reset[std::size_t(r)].calls == 0);
      CHECK(after_reset[std::size_t(r)].elements == 0.0);
    }
  }
  // The figure of the brief: an all_reduce of n fp32 at W = 4 is 2·n·3/4 elements.
  std::vector<double> at4(4);
  run_ranks(4, [&](int r, threaded_device_comm& c) {
    device_buffer<float> f = upload(values<float>(r, n), c.stream());
    c.all_reduce(f.get(), n, reduce_op::sum);
    at4[std::size_t(r)] = c.traffic_so_far().elements;
  });
  for (const double e : at4) CHECK(e == 1500.0);
}

TEST_CASE("threaded_device_comm: bad arguments throw on every rank and leave the world usable") {
  constexpr int w = 3;
  std::vector<int> throws(w, 0);
  std::vector<std::vector<float>> out(w);
  run_ranks(w, [&](int r, threaded_device_comm& c) {
    device_buffer<float> d = upload(values<float>(r, 12), c.stream());
    const auto attempt = [&](auto&& call) {
      try {
        call();
      } catch (const mpopt::error&) {
        ++throws[std::size_t(r)];
      }
    };
    attempt([&] { c.broadcast(d.get(), 12, w); });
    attempt([&] { c.broadcast(d.get(), 12, -1); });
    attempt([&] { c.all_gather(d.get(), std::vector<std::size_t>{4, 4}); });              // two counts, three ranks
    attempt([&] { c.reduce_scatter(d.get(), d.get() + 1, {4, 4, 4}, reduce_op::sum); });  // overlaps, wrong offset
    attempt([&] { c.all_to_all_bytes(d.get(), d.get() + 1, 8); });                        // send and recv overlap
    attempt([&] { c.all_reduce(static_cast<float*>(nullptr), 4, reduce_op::sum); });
    c.all_reduce(d.get(), 12, reduce_op::sum);
    out[std::size_t(r)] = download(d.get(), 12, c.stream());
  });
  for (int r = 0; r < w; ++r) {
    CHECK(throws[std::size_t(r)] == 6);
    CHECK(raw(out[std::size_t(r)]) == raw(reduced<float>(w, 0, 12, reduce_op::sum)));
  }
}

TEST_CASE("threaded_device_comm: a failing or mismatched rank aborts the world instead of hanging it") {
  SUBCASE("a rank throws while its peers wait in a barrier: its exception reaches the caller") {
    CHECK_THROWS_WITH_AS(run_ranks(4,
                                   [](int r, threaded_device_comm& c) {
                                     if (r == 2) throw std::runtime_error("rank 2 gave up");
                                     c.barrier();
                                   }),
                         "rank 2 gave up", std::runtime_error);
  }
  SUBCASE("ranks disagree on the count") {
    CHECK_THROWS_AS(run_ranks(2,
                              [](int r, threaded_device_comm& c) {
                                device_buffer<float> d = upload(values<float>(r, 8), c.stream());
                                c.all_reduce(d.get(), r == 0 ? 8 : 4, reduce_op::sum);
                              }),
                    mpopt::error);
  }
  SUBCASE("ranks call different collectives") {
    CHECK_THROWS_AS(run_ranks(3,
                              [](int r, threaded_device_comm& c) {
                                if (r == 1) {
                                  c.barrier();
                                } else {
                                  device_buffer<float> d = upload(values<float>(r, 8), c.stream());
                                  c.broadcast(d.get(), 8, 0);
                                }
                              }),
                    mpopt::error);
  }
  SUBCASE("a rank returns while its peers wait") {
    CHECK_THROWS_AS(run_ranks(3,
                              [](int r, threaded_device_comm& c) {
                                if (r != 0) c.barrier();
                              }),
                    mpopt::error);
  }
}
