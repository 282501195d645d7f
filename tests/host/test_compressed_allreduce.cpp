// The 1-bit compressed allreduce on the host (mpopt/onebit/compressed_allreduce.hpp) without MPI: the layout
// arithmetic, the packed format (MSB-first bytes, numpy.packbits order), the sign of zero, -0 and NaN, the fixed
// reduction order, W ranks simulated in one process against a double-precision D.2 oracle, independence from the
// OpenMP thread count, world size 1 (exact identity), the argument errors, and single_rank's byte collectives.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mpopt/comm/communicator.hpp"
#include "mpopt/error.hpp"
#include "mpopt/onebit/compressed_allreduce.hpp"

namespace {

using mpopt::onebit::compressed_layout;
using mpopt::onebit::word_t;
namespace ob = mpopt::onebit;

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// splitmix64: deterministic test data.
struct rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return float(next() >> 40) * 0x1p-24f * 2.0f - 1.0f; }  // [-1, 1)
};

std::vector<float> data(std::size_t n, std::uint64_t seed, float scale) {
  rng r{seed};
  std::vector<float> v(n);
  for (float& x : v) x = scale * r.uniform();
  return v;
}

// Everything one simulated rank keeps.
struct rank_state {
  std::vector<float> buf;
  ob::error_feedback err;
  std::vector<word_t> message, received;
  std::vector<double> partials;
  float worker_scale = 0, server_scale = 0;
};

// One compressed allreduce over W simulated ranks, with the blocks moved by hand as the all-to-all and the
// all-gather would.
void simulate(std::vector<rank_state>& ranks, const compressed_layout& l) {
  const std::size_t W = ranks.size(), bw = l.block_words();
  for (rank_state& r : ranks) {
    r.message.assign(l.message_words(), 0);
    r.received.assign(l.message_words(), 0);
    r.partials.assign(l.segments(), 0.0);
    r.worker_scale = ob::compress_worker(r.buf.data(), l, r.err.worker.data(), r.message.data(), r.partials.data());
  }
  for (std::size_t j = 0; j < W; ++j) {
    for (std::size_t q = 0; q < W; ++q) {
      std::memcpy(&ranks[j].received[q * bw], &ranks[q].message[j * bw], bw * sizeof(word_t));
    }
  }
  std::vector<word_t> gathered(l.message_words());
  for (std::size_t j = 0; j < W; ++j) {
    rank_state& r = ranks[j];
    r.server_scale =
        ob::compress_server(r.received.data(), l, r.err.server.data(), &gathered[j * bw], r.partials.data());
  }
  for (rank_state& r : ranks) ob::decompress(gathered.data(), l, r.buf.data());
}

// The D.2 oracle in double from each rank's x = buf + worker_error (formed in fp32, as the tensors are): the worker
// RMS scales, z = mean of the compressed workers + server error, and the per-chunk compressed z.
struct oracle {
  std::vector<double> z, out, worker_scale, server_scale;
};

oracle d2_oracle(const std::vector<rank_state>& ranks, const compressed_layout& l) {
  const std::size_t W = ranks.size();
  oracle o;
  o.z.assign(l.padded, 0.0);
  for (std::size_t q = 0; q < W; ++q) {
    std::vector<double> x(l.padded);
    double ss = 0;
    for (std::size_t i = 0; i < l.padded; ++i) {
      x[i] = double((i < l.n ? ranks[q].buf[i] : 0.0f) + ranks[q].err.worker[i]);
      ss += x[i] * x[i];
    }
    const double s = std::sqrt(ss / double(l.padded));
    o.worker_scale.push_back(s);
    for (std::size_t i = 0; i < l.padded; ++i) o.z[i] += (x[i] >= 0 ? s : -s) / double(W);
  }
  o.out.assign(l.padded, 0.0);
  for (std::size_t j = 0; j < W; ++j) {
    double ss = 0;
    for (std::size_t i = j * l.chunk; i < (j + 1) * l.chunk; ++i) {
      o.z[i] += double(ranks[j].err.server[i - j * l.chunk]);
      ss += o.z[i] * o.z[i];
    }
    const double s = std::sqrt(ss / double(l.chunk));
    o.server_scale.push_back(s);
    for (std::size_t i = j * l.chunk; i < (j + 1) * l.chunk; ++i) o.out[i] = o.z[i] >= 0 ? s : -s;
  }
  return o;
}

// A communicator that claims device memory (and does nothing): the host primitive must refuse it.
struct fake_device_comm final : mpopt::comm::communicator {
  int rank() const override { return 0; }
  int size() const override { return 1; }
  mpopt::comm::memory_space memory() const override { return mpopt::comm::memory_space::device; }
  std::string name() const override { return "fake-device"; }
  void all_reduce(void*, std::size_t, mpopt::dtype, mpopt::comm::reduce_op) override {}
  void reduce_scatter(const void*, void*, const std::size_t*, mpopt::dtype, mpopt::comm::reduce_op) override {}
  void all_gather(void*, const std::size_t*, mpopt::dtype) override {}
  void broadcast(void*, std::size_t, mpopt::dtype, int) override {}
  void barrier() override {}
  void all_to_all_bytes(const void*, void*, std::size_t) override {}
  void all_gather_bytes(void*, std::size_t) override {}
};

}  // namespace

TEST_CASE("onebit layout: n padded to a multiple of 32·W, whole words in every chunk") {
  for (int W : {1, 2, 3, 4, 5, 8}) {
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(7), std::size_t(31), std::size_t(32),
                          std::size_t(33), std::size_t(95), std::size_t(96), std::size_t(97), std::size_t(1000),
                          std::size_t(4096 + 5), std::size_t(1) << 20}) {
      CAPTURE(W);
      CAPTURE(n);
      const compressed_layout l = compressed_layout::make(n, W);
      const std::size_t m = 32 * std::size_t(W);
      CHECK(l.n == n);
      CHECK(l.world == W);
      CHECK(l.padded % m == 0);
      CHECK(l.padded >= n);
      CHECK(l.padded < n + m);
      CHECK(l.chunk * std::size_t(W) == l.padded);
      CHECK(l.chunk % 32 == 0);
      CHECK(l.chunk_words() == l.chunk / 32);
      CHECK(l.block_words() == l.chunk / 32 + 1);
      CHECK(l.message_words() == (l.chunk / 32 + 1) * std::size_t(W));
      CHECK(l.segments() == (l.padded + 1023) / 1024);
      if (n == 0) CHECK(l.padded == 0);
    }
  }
  // Worked examples.
  CHECK(compressed_layout::make(1000, 3).padded == 1056);  // 11·96
  CHECK(compressed_layout::make(1000, 3).chunk == 352);
  CHECK(compressed_layout::make(1, 4).padded == 128);  // n < W: every rank still owns one word
  CHECK(compressed_layout::make(1, 4).chunk == 32);
  CHECK(compressed_layout::make(33, 1).padded == 64);
  CHECK(compressed_layout::make(64, 2).padded == 64);
  CHECK(compressed_layout::make(64, 2) == compressed_layout::make(64, 2));
  CHECK(compressed_layout::make(64, 2) != compressed_layout::make(65, 2));

  CHECK_THROWS_WITH_AS(compressed_layout::make(5, 0), doctest::Contains("world 0"), mpopt::error);
  CHECK_THROWS_WITH_AS(compressed_layout::make(5, -3), doctest::Contains("world -3"), mpopt::error);
  CHECK_THROWS_WITH_AS(compressed_layout::make(SIZE_MAX - 3, 2), doctest::Contains("overflows"), mpopt::error);
}

TEST_CASE("onebit packing: element e is bit e^7, so the bytes are MSB-first (numpy.packbits)") {
  for (unsigned e = 0; e < 32; ++e) {
    CAPTURE(e);
    const word_t w = ob::lanes_to_word(word_t(1) << e);
    CHECK(w == word_t(1) << (e ^ 7u));
    CHECK(ob::bit_position(e) == (e ^ 7u));
    for (unsigned f = 0; f < 32; ++f) CHECK(ob::unpack_bit(w, f) == (f == e ? 1u : 0u));
  }
  rng r{42};
  for (int t = 0; t < 1000; ++t) {
    const word_t lanes = word_t(r.next());
    const word_t w = ob::lanes_to_word(lanes);
    CHECK(ob::lanes_to_word(w) == lanes);  // reversing the bits of each byte twice
    bool same = true;
    for (unsigned e = 0; e < 32; ++e) same = same && ob::unpack_bit(w, e) == ((lanes >> e) & 1u);
    CHECK(same);
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  // Byte by byte against a packbits written from its definition: byte b holds elements 8b..8b+7, first in bit 7.
  for (int t = 0; t < 200; ++t) {
    bool bit[32];
    word_t lanes = 0;
    for (unsigned e = 0; e < 32; ++e) {
      bit[e] = (r.next() & 1u) != 0;
      lanes |= word_t(bit[e]) << e;
    }
    const word_t w = ob::lanes_to_word(lanes);
    unsigned char bytes[4];
    std::memcpy(bytes, &w, 4);
    for (unsigned b = 0; b < 4; ++b) {
      unsigned char want = 0;
      for (unsigned k = 0; k < 8; ++k) want = static_cast<unsigned char>(want | (bit[8 * b + k] ? 0x80u >> k : 0u));
      CHECK(int(bytes[b]) == int(want));
    }
  }
  // The worker pass packs the same way: signs + - + + ... of the first word give byte 0 = 0b10110000.
  {
    const compressed_layout l = compressed_layout::make(4, 1);
    std::vector<float> buf = {1.0f, -1.0f, 0.0f, 2.0f};
    ob::error_feedback err(l);
    for (std::size_t i = 4; i < 32; ++i) err.worker[i] = -1.0f;  // the padding's error makes its signs -1
    std::vector<word_t> message(l.message_words());
    std::vector<double> partials(l.segments());
    ob::compress_worker(buf.data(), l, err.worker.data(), message.data(), partials.data());
    unsigned char bytes[4];
    std::memcpy(bytes, &message[0], 4);
    CHECK(int(bytes[0]) == 0xb0);
    CHECK(int(bytes[1]) == 0);
    CHECK(int(bytes[3]) == 0);
  }
#endif
}

TEST_CASE("onebit signs: +0 and -0 are +1 (DeepSpeed's NCCL backend), NaN is -1") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(ob::sign_bit(0.0f) == 1u);
  CHECK(ob::sign_bit(-0.0f) == 1u);  // -0.0 >= 0 holds; DeepSpeed's `compressed` backend (!signbit) would give -1
  CHECK(ob::sign_bit(1e-45f) == 1u);
  CHECK(ob::sign_bit(-1e-45f) == 0u);
  CHECK(ob::sign_bit(inf) == 1u);
  CHECK(ob::sign_bit(-inf) == 0u);
  CHECK(ob::sign_bit(nan) == 0u);
  CHECK(ob::sign_bit(-nan) == 0u);
  CHECK(ob::decompressed(1u, 0.5f) == 0.5f);
  CHECK(ob::decompressed(0u, 0.5f) == -0.5f);
  // x - s·sgn(x) for a zero: -s whatever the zero's sign.
  CHECK(ob::compression_error(-0.0f, ob::sign_bit(-0.0f), 2.0f) == -2.0f);
  CHECK(ob::compression_error(0.0f, ob::sign_bit(0.0f), 2.0f) == -2.0f);
  CHECK(ob::compression_error(-3.0f, 0u, 2.0f) == -1.0f);
  CHECK(ob::scale_of(12.0, 3) == 2.0f);
  CHECK(ob::scale_of(0.0, 0) == 0.0f);
  CHECK(ob::server_weight(3.0f, 4) == 0.75f);
  CHECK(ob::add_signed(1.0f, 0u, 0.25f) == 0.75f);

  // Through the worker pass: a buffer of +0 and -0 compresses to all +1 with scale 0 and zero error.
  const compressed_layout l = compressed_layout::make(64, 2);
  std::vector<float> buf(64);
  for (std::size_t i = 0; i < 64; ++i) buf[i] = i % 2 ? -0.0f : 0.0f;
  ob::error_feedback err(l);
  std::vector<word_t> message(l.message_words());
  std::vector<double> partials(l.segments());
  CHECK(ob::compress_worker(buf.data(), l, err.worker.data(), message.data(), partials.data()) == 0.0f);
  CHECK(message[0] == 0xffffffffu);
  CHECK(message[1] == 0u);  // block 0's scale word: +0.0f
  CHECK(message[2] == 0xffffffffu);
  for (std::size_t i = 0; i < 64; ++i) CHECK(err.worker[i] == 0.0f);
}

TEST_CASE("onebit reduction order: a warp's shuffle-down tree and the strided final lanes") {
  // combine_lanes against a literal simulation of __shfl_down_sync (every lane reads lane + offset, then adds).
  rng r{7};
  for (int t = 0; t < 100; ++t) {
    double lanes[32], warp[32];
    for (int e = 0; e < 32; ++e) lanes[e] = warp[e] = double(r.uniform()) * std::ldexp(1.0, int(r.next() % 40) - 20);
    for (int offset = 16; offset > 0; offset /= 2) {
      double from[32];
      for (int e = 0; e < 32; ++e) from[e] = e + offset < 32 ? warp[e + offset] : warp[e];
      for (int e = 0; e < 32; ++e) warp[e] += from[e];
    }
    CHECK(ob::combine_lanes(lanes) == warp[0]);  // bitwise: the same additions in the same order
  }
  // finish_sum_of_squares: exact sums come out exact, whatever the count.
  for (std::size_t count :
       {std::size_t(0), std::size_t(1), std::size_t(255), std::size_t(256), std::size_t(257), std::size_t(5000)}) {
    std::vector<double> p(count);
    for (std::size_t k = 0; k < count; ++k) p[k] = double(k % 17);
    double want = 0;
    for (double x : p) want += x;
    CHECK(ob::finish_sum_of_squares(p.data(), count) == want);
  }
}

TEST_CASE("onebit simulated ranks: the D.2 oracle, exact error feedback, the same bits on every rank") {
  for (int W : {2, 3, 4}) {
    for (std::size_t n : {std::size_t(1), std::size_t(3), std::size_t(1000), std::size_t(5001)}) {
      CAPTURE(W);
      CAPTURE(n);
      const compressed_layout l = compressed_layout::make(n, W);
      std::vector<rank_state> ranks(static_cast<std::size_t>(W));
      for (int q = 0; q < W; ++q) ranks[std::size_t(q)].err = ob::error_feedback(l);
      for (int call = 0; call < 3; ++call) {
        CAPTURE(call);
        for (int q = 0; q < W; ++q) ranks[std::size_t(q)].buf = data(n, 100 * call + q, 1.0f + 0.37f * float(q));
        const std::vector<rank_state>& before = ranks;
        const oracle o = d2_oracle(before, l);
        simulate(ranks, l);
        std::size_t bad = 0, skipped = 0;
        for (int q = 0; q < W; ++q) {
          const rank_state& r = ranks[std::size_t(q)];
          CHECK(std::fabs(double(r.worker_scale) - o.worker_scale[std::size_t(q)]) <=
                1e-6 * o.worker_scale[std::size_t(q)]);
          CHECK(std::fabs(double(r.server_scale) - o.server_scale[std::size_t(q)]) <=
                1e-5 * o.server_scale[std::size_t(q)]);
          for (std::size_t i = 0; i < n; ++i) {
            if (bits_of(r.buf[i]) != bits_of(ranks[0].buf[i])) ++bad;  // identical on every rank
            if (std::fabs(o.z[i]) < 1e-6) {                            // sign of z unstable at fp32 precision
              ++skipped;
              continue;
            }
            if (std::fabs(double(r.buf[i]) - o.out[i]) > 1e-5 * std::fabs(o.out[i])) ++bad;
          }
        }
        CHECK(bad == 0);
        CHECK(skipped == 0);
      }
    }
  }
}

#if defined(_OPENMP)
TEST_CASE("onebit: the bits do not depend on the OpenMP thread count") {
  const compressed_layout l = compressed_layout::make(300001, 3);
  const std::vector<float> buf = data(l.n, 9, 2.0f);
  auto run = [&](int threads, std::vector<word_t>& message, std::vector<float>& err, float& scale) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    ob::error_feedback e(l);
    for (std::size_t i = 0; i < l.padded; ++i) e.worker[i] = 0.01f * float(int(i % 13) - 6);
    message.assign(l.message_words(), 0);
    std::vector<double> partials(l.segments());
    scale = ob::compress_worker(buf.data(), l, e.worker.data(), message.data(), partials.data());
    err.assign(e.worker.data(), e.worker.data() + l.padded);
    omp_set_num_threads(before);
  };
  std::vector<word_t> m1, m4;
  std::vector<float> e1, e4;
  float s1 = 0, s4 = 0;
  run(1, m1, e1, s1);
  run(4, m4, e4, s4);
  CHECK(bits_of(s1) == bits_of(s4));
  CHECK(m1 == m4);
  CHECK(std::memcmp(e1.data(), e4.data(), e1.size() * sizeof(float)) == 0);
}
#endif

TEST_CASE("onebit world of one: buf exact, err untouched, nothing moves") {
  mpopt::comm::single_rank one;
  ob::compressed_allreduce allreduce(one, 1000);
  CHECK(&allreduce.communicator() == &one);
  CHECK(allreduce.capacity() == compressed_layout::make(1000, 1));
  const compressed_layout l = compressed_layout::make(777, 1);
  ob::error_feedback err(l);
  for (std::size_t i = 0; i < l.padded; ++i) err.worker[i] = 0.5f + float(i);
  std::vector<float> buf = data(777, 3, 5.0f);
  buf[0] = -0.0f;
  buf[1] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> before = buf;
  allreduce(buf.data(), l, err);
  CHECK(std::memcmp(buf.data(), before.data(), buf.size() * sizeof(float)) == 0);
  for (std::size_t i = 0; i < l.padded; ++i) CHECK(err.worker[i] == 0.5f + float(i));
  for (std::size_t i = 0; i < l.chunk; ++i) CHECK(err.server[i] == 0.0f);
  CHECK(allreduce.worker_scale() == 0.0f);
  CHECK(one.traffic_so_far().calls == 0);
  // n = 0 is fine with a null buf.
  ob::error_feedback none(compressed_layout::make(0, 1));
  allreduce(nullptr, compressed_layout::make(0, 1), none);
  // reset() zeroes both buffers.
  err.reset();
  for (std::size_t i = 0; i < l.padded; ++i) CHECK(err.worker[i] == 0.0f);
}

TEST_CASE("onebit argument errors name the argument and the value; nothing changes") {
  mpopt::comm::single_rank one;
  ob::compressed_allreduce allreduce(one, 1000);
  const compressed_layout l = compressed_layout::make(777, 1);
  ob::error_feedback err(l);
  std::vector<float> buf(1000, 1.0f);
  auto unchanged = [&] {
    bool same = true;
    for (float x : buf) same = same && x == 1.0f;
    for (std::size_t i = 0; i < err.worker.size(); ++i) same = same && err.worker[i] == 0.0f;
    return same;
  };
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), compressed_layout::make(777, 2), err),
                       doctest::Contains("layout.world 2 but the communicator has 1 ranks"), mpopt::error);
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), compressed_layout::make(1001, 1), err),
                       doctest::Contains("layout.n 1001 exceeds max_elements 1000"), mpopt::error);
  compressed_layout forged = l;
  forged.padded += 32;
  forged.chunk += 32;
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), forged, err), doctest::Contains("is not compressed_layout::make(777, 1)"),
                       mpopt::error);
  ob::error_feedback small(compressed_layout::make(500, 1));
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), l, small),
                       doctest::Contains("err.worker has 512 elements; layout.padded is 800"), mpopt::error);
  ob::error_feedback odd(l);
  odd.server = mpopt::host::aligned_buffer<float>(3);
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), l, odd), doctest::Contains("err.server has 3 elements"), mpopt::error);
  CHECK_THROWS_WITH_AS(allreduce(nullptr, l, err), doctest::Contains("buf is null for layout.n 777"), mpopt::error);
  try {
    allreduce(buf.data(), compressed_layout::make(1001, 1), err);
  } catch (const mpopt::error& e) {
    CHECK(e.code() == mpopt::errc::invalid_argument);
  }
  CHECK(unchanged());

  fake_device_comm device;
  CHECK_THROWS_WITH_AS(ob::compressed_allreduce(device, 10), doctest::Contains("'fake-device' works on device memory"),
                       mpopt::error);
}

TEST_CASE("single_rank byte collectives: all_to_all_bytes copies, all_gather_bytes keeps, overlap is refused") {
  mpopt::comm::single_rank one;
  std::vector<unsigned char> send = {1, 2, 3, 4, 5}, recv(6, 0xee);
  one.all_to_all_bytes(send.data(), recv.data(), 5);
  CHECK(recv == std::vector<unsigned char>{1, 2, 3, 4, 5, 0xee});
  one.all_to_all_bytes(send.data(), recv.data(), 0);
  one.all_gather_bytes(send.data(), 5);
  CHECK(send == std::vector<unsigned char>{1, 2, 3, 4, 5});
  CHECK_THROWS_WITH_AS(one.all_to_all_bytes(send.data(), send.data() + 2, 3), doctest::Contains("overlap"),
                       mpopt::error);
  CHECK(one.traffic_so_far().bytes == 0.0);
}
