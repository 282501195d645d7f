// The 1-bit compressed allreduce over MPI (mpopt/onebit/compressed_allreduce.hpp with mpopt::comm::mpi) at 1..4
// ranks, and the communicator's byte collectives it rests on:
//   (a) the D.2 oracle, computed here in double from every rank's tensors (gathered with plain MPI);
//   (b) exact error feedback: compressed value + new error == x up to the one rounding of the subtraction, on the
//       worker and on the server side;
//   (c) every rank ends with the same output bits;
//   (d) over repeated calls the running mean of the outputs converges to the true mean, as fast as the error
//       feedback's telescoping sum says;
//   (e) all_to_all_bytes and all_gather_bytes directly, with their traffic and refusals;
//   (f) n = 0 and n smaller than the world size.
// Every rank makes every collective call even when a check fails (CHECK, never REQUIRE, before a collective).
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mpi_test.hpp"
#include "mpopt/comm/mpi.hpp"
#include "mpopt/error.hpp"
#include "mpopt/onebit/compressed_allreduce.hpp"

namespace {

using mpopt::onebit::compressed_layout;
using mpopt::onebit::word_t;
using mpopt_test::rank_tag;
namespace ob = mpopt::onebit;

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Half an ulp of f: the most one correctly rounded fp32 operation that returned f can be off by.
double half_ulp(float f) {
  const float a = std::fabs(f);
  return 0.5 * double(std::nextafter(a, INFINITY) - a);
}

// Test data: a hash of (rank, element, call) mapped to [-1, 1) and scaled per rank, so the worker scales differ.
float value(int rank, std::size_t i, int call) {
  std::uint64_t z = std::uint64_t(rank) * 0x9e3779b97f4a7c15ull + std::uint64_t(i) * 0xbf58476d1ce4e5b9ull +
                    std::uint64_t(call) * 0x94d049bb133111ebull + 1;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (1.0f + 0.37f * float(rank)) * (float(z >> 40) * 0x1p-23f - 1.0f);
}

// Concatenation in rank order of every rank's `mine` (all the same length).
std::vector<float> gather_all(const float* mine, std::size_t count) {
  std::vector<float> all(count * std::size_t(mpopt_test::world_size()));
  if (count > 0) MPI_Allgather(mine, int(count), MPI_FLOAT, all.data(), int(count), MPI_FLOAT, MPI_COMM_WORLD);
  return all;
}

// Every rank's state just before a call: inputs (W·n), worker errors (W·padded), server errors (W·chunk: rank j's
// chunk at j·chunk, so it lines up with the elements).
struct world_state {
  std::vector<float> input, worker, server;
};

world_state gather_state(const std::vector<float>& buf, const ob::error_feedback& err, const compressed_layout& l) {
  return {gather_all(buf.data(), l.n), gather_all(err.worker.data(), l.padded), gather_all(err.server.data(), l.chunk)};
}

// x of rank q, formed in fp32 as the tensors are (buf + worker_error, 0 in the padding).
float x_of(const world_state& g, const compressed_layout& l, std::size_t q, std::size_t i) {
  return (i < l.n ? g.input[q * l.n + i] : 0.0f) + g.worker[q * l.padded + i];
}

// The D.2 oracle in double: s_w[q] = RMS of x_q over the padded length, z = sum_q s_w[q]/W·sgn(x_q) + server error,
// s_s[j] = RMS of z over chunk j, out = s_s[j]·sgn(z).
struct oracle {
  std::vector<double> z, out, worker_scale, server_scale;
};

oracle d2_oracle(const world_state& g, const compressed_layout& l) {
  const std::size_t W = std::size_t(l.world);
  oracle o;
  o.z.assign(l.padded, 0.0);
  for (std::size_t q = 0; q < W; ++q) {
    double ss = 0;
    for (std::size_t i = 0; i < l.padded; ++i) ss += double(x_of(g, l, q, i)) * double(x_of(g, l, q, i));
    const double s = std::sqrt(ss / double(l.padded));
    o.worker_scale.push_back(s);
    for (std::size_t i = 0; i < l.padded; ++i) o.z[i] += (x_of(g, l, q, i) >= 0 ? s : -s) / double(W);
  }
  o.out.assign(l.padded, 0.0);
  for (std::size_t j = 0; j < W; ++j) {
    double ss = 0;
    for (std::size_t i = j * l.chunk; i < (j + 1) * l.chunk; ++i) {
      o.z[i] += double(g.server[i]);
      ss += o.z[i] * o.z[i];
    }
    const double s = std::sqrt(ss / double(l.chunk));
    o.server_scale.push_back(s);
    for (std::size_t i = j * l.chunk; i < (j + 1) * l.chunk; ++i) o.out[i] = o.z[i] >= 0 ? s : -s;
  }
  return o;
}

std::vector<float> inputs(int rank, std::size_t n, int call) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = value(rank, i, call);
  return v;
}

}  // namespace

TEST_CASE("compressed allreduce: the D.2 oracle, exact error feedback, the same bits on every rank") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  ob::compressed_allreduce allreduce(comm, 6000);
  // n: a multiple of nothing, one below a whole 32·W, a size with several reduction segments per chunk; and n < W.
  for (std::size_t n :
       {std::size_t(1), std::size_t(3), std::size_t(1000), std::size_t(32 * W * 40 - 1), std::size_t(5999)}) {
    CAPTURE(n);
    const compressed_layout l = compressed_layout::make(n, W);
    ob::error_feedback err(l);
    for (int call = 0; call < 3; ++call) {  // calls 1 and 2 start from the error feedback of the previous ones
      CAPTURE(call);
      std::vector<float> buf = inputs(me, n, call);
      const world_state g = gather_state(buf, err, l);
      const std::vector<float> old_worker(err.worker.data(), err.worker.data() + l.padded);
      const std::vector<float> old_server(err.server.data(), err.server.data() + l.chunk);
      allreduce(buf.data(), l, err);
      if (W == 1) {  // no compression at one rank: buf exact, err untouched
        CHECK(buf == g.input);
        continue;
      }
      const float s_w = allreduce.worker_scale(), s_s = allreduce.server_scale();
      const std::vector<float> worker_scales = gather_all(&s_w, 1);

      // (a) Against the oracle on every element. Where |z| < 1e-6 the sign of z is not determined at fp32
      // precision: z's fp32 rounding error is about W·2^-24 times the largest worker weight (~1 here), so a z that
      // small may come out with either sign. The data make none that small (checked), so nothing is skipped.
      const oracle o = d2_oracle(g, l);
      std::size_t bad = 0, skipped = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (std::fabs(o.z[i]) < 1e-6) {
          ++skipped;
          continue;
        }
        // fp32 roundings of the scales, of the W-term sum and of z, each ~2^-24 relative, average out in the RMS;
        // 1e-5 relative leaves a wide margin.
        bad += std::fabs(double(buf[i]) - o.out[i]) > 1e-5 * std::fabs(o.out[i]);
      }
      CHECK(bad == 0);
      CHECK(skipped == 0);
      // The scales: s_w is the double RMS rounded once (one ulp allowed for the order of the double sum); s_s is the
      // RMS of the fp32 z, close to the oracle's.
      CHECK(std::fabs(double(s_w) - o.worker_scale[std::size_t(me)]) <= 0x1p-23 * o.worker_scale[std::size_t(me)]);
      CHECK(std::fabs(double(s_s) - o.server_scale[std::size_t(me)]) <= 1e-5 * o.server_scale[std::size_t(me)]);

      // (b) Worker: new error == fp32(x - s_w·sgn(x)) bit for bit, i.e. compressed + error == x up to the single
      // rounding of that subtraction (half an ulp of the error; zero where the subtraction is exact). Bitwise is the
      // claim because the library does exactly that one fp32 subtraction: nothing else may differ.
      std::size_t worker_bad = 0, worker_far = 0;
      for (std::size_t i = 0; i < l.padded; ++i) {
        const float x = (i < n ? g.input[std::size_t(me) * n + i] : 0.0f) + old_worker[i];
        const float c = x >= 0.0f ? s_w : -s_w;
        worker_bad += bits_of(err.worker[i]) != bits_of(x - c);
        worker_far += std::fabs(double(c) + double(err.worker[i]) - double(x)) > half_ulp(err.worker[i]);
      }
      CHECK(worker_bad == 0);
      CHECK(worker_far == 0);
      // Server (this rank's chunk): z = sum over q in rank order of ±fp32(s_w[q]/W), plus the old server error, in
      // fp32 as the format specifies; new error == fp32(z - s_s·sgn(z)); the output on the chunk is s_s·sgn(z).
      std::size_t server_bad = 0, server_far = 0, out_bad = 0;
      const std::size_t first = std::size_t(me) * l.chunk;
      for (std::size_t k = 0; k < l.chunk; ++k) {
        const std::size_t i = first + k;
        float y = 0.0f;
        for (std::size_t q = 0; q < std::size_t(W); ++q) {
          const float weight = worker_scales[q] / float(W);
          y = x_of(g, l, q, i) >= 0.0f ? y + weight : y - weight;
        }
        const float z = y + old_server[k];
        const float c = z >= 0.0f ? s_s : -s_s;
        server_bad += bits_of(err.server[k]) != bits_of(z - c);
        server_far += std::fabs(double(c) + double(err.server[k]) - double(z)) > half_ulp(err.server[k]);
        if (i < n) out_bad += bits_of(buf[i]) != bits_of(c);
      }
      CHECK(server_bad == 0);
      CHECK(server_far == 0);
      CHECK(out_bad == 0);

      // (c) Rank 0's output bits, everywhere.
      std::vector<float> zero = buf;
      MPI_Bcast(zero.data(), int(n), MPI_FLOAT, 0, MPI_COMM_WORLD);
      CHECK(std::memcmp(zero.data(), buf.data(), n * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("compressed allreduce: repeated calls converge to the mean through the error feedback") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  const std::size_t n = 1000;
  const compressed_layout l = compressed_layout::make(n, W);
  ob::compressed_allreduce allreduce(comm, n);
  ob::error_feedback err(l);
  const std::vector<float> input = inputs(me, n, 7);
  const std::vector<float> all = gather_all(input.data(), n);
  std::vector<double> mean(n, 0.0);
  for (std::size_t q = 0; q < std::size_t(W); ++q) {
    for (std::size_t i = 0; i < n; ++i) mean[i] += double(all[q * n + i]) / double(W);
  }
  double rms = 0;
  for (double m : mean) rms += m * m;
  rms = std::sqrt(rms / double(n));

  // With zero initial errors, sum over calls of the output = T·mean - mean_q(worker error after T) - server error
  // after T (the worker and server identities summed over the calls telescope), up to fp32 roundings. So the
  // running mean is off by the final errors / T. The errors of the worst elements grow slowly (about sqrt(T) here),
  // so the RMS error of the running mean is the measure: 0.74·rms after one call, 0.05 after 40, 0.006 after 400 at
  // 2-4 ranks with these data (a simulation to T = 20000 reaches 1.2e-4). The bounds leave a factor 2 or more.
  std::vector<double> sum(n, 0.0);
  std::vector<float> buf(n);
  double error_40 = 0;
  for (int T = 1; T <= 400; ++T) {
    buf = input;
    allreduce(buf.data(), l, err);
    for (std::size_t i = 0; i < n; ++i) sum[i] += double(buf[i]);
    if (T != 1 && T != 40 && T != 400) continue;
    double sq = 0, worst = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double d = sum[i] / T - mean[i];
      sq += d * d;
      worst = std::fmax(worst, std::fabs(d));
    }
    const double error = std::sqrt(sq / double(n)) / rms;
    CAPTURE(T);
    CAPTURE(error);
    CAPTURE(worst / rms);
    if (W == 1) {
      CHECK(error <= 1e-6);  // exact (up to the double sums)
      continue;
    }
    if (T == 1) CHECK(error > 0.3);  // one call alone is a coarse approximation: the convergence below is real
    if (T == 40) {
      CHECK(error < 0.1);
      error_40 = error;
    }
    if (T == 400) {
      CHECK(error < 0.015);
      CHECK(error < error_40 / 5);
      CHECK(worst < 0.2 * rms);
      // The telescoped identity, element by element, with the final error buffers.
      std::vector<float> worker_sum(err.worker.data(), err.worker.data() + n);
      MPI_Allreduce(MPI_IN_PLACE, worker_sum.data(), int(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      const std::vector<float> server = gather_all(err.server.data(), l.chunk);
      std::size_t bad = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const double predicted = double(T) * mean[i] - double(worker_sum[i]) / double(W) - double(server[i]);
        // Each call adds a few fp32 roundings of magnitude ~2^-24·(values up to ~30): 1e-6·rms per call is generous.
        bad += std::fabs(sum[i] - predicted) > 1e-6 * double(T) * rms;
      }
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("compressed allreduce: n = 0, n < W, argument errors on every rank, traffic about 1/32 of fp32") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  ob::compressed_allreduce allreduce(comm, 1 << 16);

  // (f) n = 0: nothing moves and a null buf is fine.
  comm.reset_traffic();
  const compressed_layout none = compressed_layout::make(0, W);
  ob::error_feedback none_err(none);
  allreduce(nullptr, none, none_err);
  CHECK(comm.traffic_so_far().calls == 0);

  // n < W: every rank still owns one word; the result is the oracle's and the same on every rank.
  for (std::size_t n = 1; n < std::size_t(W); ++n) {
    const compressed_layout l = compressed_layout::make(n, W);
    CHECK(l.chunk == 32);
    ob::error_feedback err(l);
    std::vector<float> buf = inputs(me, n, 11);
    const oracle o = d2_oracle(gather_state(buf, err, l), l);
    allreduce(buf.data(), l, err);
    for (std::size_t i = 0; i < n; ++i) CHECK(std::fabs(double(buf[i]) - o.out[i]) <= 1e-5 * std::fabs(o.out[i]));
    std::vector<float> zero = buf;
    MPI_Bcast(zero.data(), int(n), MPI_FLOAT, 0, MPI_COMM_WORLD);
    CHECK(std::memcmp(zero.data(), buf.data(), n * sizeof(float)) == 0);
  }

  // Every rank refuses the same bad call (so none is left waiting in a collective), and nothing moved.
  const compressed_layout l = compressed_layout::make(1000, W);
  ob::error_feedback err(l);
  std::vector<float> buf(1000, 1.0f);
  comm.reset_traffic();
  const std::string wrong_world = "layout.world " + std::to_string(W + 1);
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), compressed_layout::make(1000, W + 1), err),
                       doctest::Contains(wrong_world.c_str()), mpopt::error);
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), compressed_layout::make(70000, W), err),
                       doctest::Contains("layout.n 70000 exceeds max_elements 65536"), mpopt::error);
  ob::error_feedback wrong(compressed_layout::make(100, W));
  CHECK_THROWS_WITH_AS(allreduce(buf.data(), l, wrong), doctest::Contains("err.worker has"), mpopt::error);
  CHECK(comm.traffic_so_far().calls == 0);
  for (float x : buf) CHECK(x == 1.0f);

  // Bytes on the wire per call: two collectives of W blocks of (chunk/32 + 1) words, against an fp32 all-reduce.
  const compressed_layout big = compressed_layout::make(1 << 16, W);
  ob::error_feedback big_err(big);
  std::vector<float> v = inputs(me, big.n, 3);
  comm.reset_traffic();
  allreduce(v.data(), big, big_err);
  const double share = double(W - 1) / double(W);
  CHECK(comm.traffic_so_far().calls == (W > 1 ? 2 : 0));
  if (W > 1) {
    CHECK(comm.traffic_so_far().bytes == doctest::Approx(2 * share * double(big.message_words() * 4)));
    const double fp32 = 2 * share * 4.0 * double(big.n);
    CHECK(comm.traffic_so_far().bytes / fp32 == doctest::Approx(1.0 / 32).epsilon(0.01));
  }
}

namespace {

// Byte k of the block rank `from` sends to rank `to`: distinct for every (from, to, k) used here.
unsigned char pattern(int from, int to, std::size_t k) {
  return static_cast<unsigned char>((from * 131 + to * 17 + int(k % 251) * 7 + int(k / 251) + 1) & 0xff);
}

}  // namespace

TEST_CASE("mpi byte collectives: all_to_all_bytes, all_gather_bytes, their traffic and refusals") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  const std::size_t w = std::size_t(W);
  for (std::size_t b : {std::size_t(1), std::size_t(3), std::size_t(7), std::size_t(1000), std::size_t(4099)}) {
    CAPTURE(b);
    // (e) all-to-all: block j of rank r goes to rank j as its block r.
    std::vector<unsigned char> send(w * b), recv(w * b + 5, 0xee);
    for (int j = 0; j < W; ++j) {
      for (std::size_t k = 0; k < b; ++k) send[std::size_t(j) * b + k] = pattern(me, j, k);
    }
    const std::vector<unsigned char> send_copy = send;
    comm.reset_traffic();
    comm.all_to_all_bytes(send.data(), recv.data(), b);
    std::size_t bad = 0;
    for (int r = 0; r < W; ++r) {
      for (std::size_t k = 0; k < b; ++k) bad += recv[std::size_t(r) * b + k] != pattern(r, me, k);
    }
    CHECK(bad == 0);
    for (std::size_t k = w * b; k < recv.size(); ++k) CHECK(recv[k] == 0xee);  // past the end: untouched
    CHECK(send == send_copy);

    // all-gather in place: rank r's block at r·b; junk elsewhere becomes the owners' bytes.
    std::vector<unsigned char> buf(w * b + 3, 0x5a);
    for (std::size_t k = 0; k < b; ++k) buf[std::size_t(me) * b + k] = pattern(me, me, k);
    comm.all_gather_bytes(buf.data(), b);
    bad = 0;
    for (int r = 0; r < W; ++r) {
      for (std::size_t k = 0; k < b; ++k) bad += buf[std::size_t(r) * b + k] != pattern(r, r, k);
    }
    CHECK(bad == 0);
    for (std::size_t k = w * b; k < buf.size(); ++k) CHECK(buf[k] == 0x5a);

    // Traffic: (W-1)/W of the W·b bytes each, a byte counting as an element.
    const double share = double(W - 1) / double(W);
    CHECK(comm.traffic_so_far().calls == 2);
    CHECK(comm.traffic_so_far().bytes == doctest::Approx(2 * share * double(w * b)).epsilon(1e-12));
    CHECK(comm.traffic_so_far().elements == doctest::Approx(2 * share * double(w * b)).epsilon(1e-12));
  }

  // Zero bytes: a counted call that moves nothing.
  unsigned char one = 7;
  comm.reset_traffic();
  comm.all_to_all_bytes(&one, &one + 1, 0);
  comm.all_gather_bytes(&one, 0);
  CHECK(one == 7);
  CHECK(comm.traffic_so_far().calls == 2);
  CHECK(comm.traffic_so_far().bytes == 0.0);

  // Refusals, identical on every rank and before anything is counted or moved.
  comm.reset_traffic();
  std::vector<unsigned char> in_place(w * 4, 1);
  CHECK_THROWS_WITH_AS(comm.all_to_all_bytes(in_place.data(), in_place.data(), 4), doctest::Contains("overlap"),
                       mpopt::error);
  const std::size_t too_many = std::size_t(INT_MAX) + 1;
  CHECK_THROWS_WITH_AS(comm.all_gather_bytes(in_place.data(), too_many),
                       doctest::Contains("all_gather_bytes: 2147483648 exceeds MPI's int count"), mpopt::error);
  CHECK_THROWS_WITH_AS(comm.all_to_all_bytes(in_place.data(), in_place.data() + 1, too_many),
                       doctest::Contains("all_to_all_bytes: 2147483648"), mpopt::error);
  CHECK(comm.traffic_so_far().calls == 0);
  // The communicator still works.
  comm.all_gather_bytes(in_place.data(), 4);
  CHECK(in_place == std::vector<unsigned char>(w * 4, 1));
}
