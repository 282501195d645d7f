// The MPI communicator (mpopt/comm/mpi.hpp) at 1..4 ranks: every collective with rank-dependent data checked
// against closed forms, counts that differ per rank and are zero, 16-bit types that travel as bytes (bit patterns,
// NaN payloads included), the refusals (16-bit reductions, counts of the wrong length), the traffic counters, and
// the single-rank communicator. Every rank makes every collective call even when a check fails (CHECK, never
// REQUIRE, before a collective), so a failure reports instead of hanging.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "mpi_test.hpp"
#include "mpopt/comm/communicator.hpp"
#include "mpopt/comm/mpi.hpp"
#include "mpopt/error.hpp"
#include "mpopt/numeric/bf16.hpp"
#include "mpopt/numeric/half.hpp"

namespace {

using mpopt::bf16_t;
using mpopt::dtype;
using mpopt::half_t;
using mpopt::comm::reduce_op;
using mpopt_test::rank_tag;
using mpopt_test::world_rank;
using mpopt_test::world_size;

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Offsets of counts in rank order.
std::vector<std::size_t> displacements(const std::vector<std::size_t>& counts) {
  std::vector<std::size_t> d(counts.size() + 1, 0);
  for (std::size_t r = 0; r < counts.size(); ++r) d[r + 1] = d[r] + counts[r];
  return d;
}

// A 16-bit pattern for element k of rank r: distinct per (r, k), covering NaNs (0x7fc1, 0xffff), infinities and
// subnormals over the ranks and indices used.
std::uint16_t pattern16(int r, std::size_t k) {
  static const std::uint16_t specials[] = {0x7fc1, 0xffff, 0x7f80, 0xff80, 0x0001, 0x8000, 0x7c01, 0xfc00};
  if (k < 8) return std::uint16_t(specials[(k + std::size_t(r)) % 8] ^ std::uint16_t(r << 4));
  return std::uint16_t(std::size_t(r) * 4099u + k * 7u + 1u);
}

}  // namespace

TEST_CASE("mpi: rank, size, a duplicated communicator") {
  mpopt::comm::mpi comm;
  CHECK(comm.rank() == world_rank());
  CHECK(comm.size() == world_size());
  CHECK(comm.memory() == mpopt::comm::memory_space::host);
  CHECK(comm.name() == "mpi");
  int cmp = MPI_UNEQUAL;
  MPI_Comm_compare(comm.native(), MPI_COMM_WORLD, &cmp);
  CHECK(cmp == MPI_CONGRUENT);  // the same group, but not the caller's communicator
}

TEST_CASE("mpi: all_reduce sum and max in fp32 and fp64") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  const double tri = double(W) * double(W + 1) / 2;   // sum over q of (q + 1)
  const double tri0 = double(W) * double(W - 1) / 2;  // sum over q of q

  for (std::size_t n : {std::size_t(1), std::size_t(1037), std::size_t(100000)}) {
    CAPTURE(n);
    // fp32 sum: (q + 1)·(i mod 97) + q/2, exact in fp32 at these magnitudes in any order.
    std::vector<float> f(n);
    for (std::size_t i = 0; i < n; ++i) f[i] = float(me + 1) * float(i % 97) + 0.5f * float(me);
    comm.all_reduce(f.data(), n, reduce_op::sum);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += f[i] != float(tri * double(i % 97) + 0.5 * tri0);
    CHECK(bad == 0);

    // fp32 max: the rank i mod W holds 1000 + i, the others something negative.
    for (std::size_t i = 0; i < n; ++i)
      f[i] = std::size_t(me) == i % std::size_t(W) ? 1000.0f + float(i) : -1.0f - float(me);
    comm.all_reduce(f.data(), n, reduce_op::max);
    bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += f[i] != 1000.0f + float(i);
    CHECK(bad == 0);

    // fp64 sum: (q + 1)·i/4 + q·2^-30, exact.
    std::vector<double> d(n);
    for (std::size_t i = 0; i < n; ++i) d[i] = double(me + 1) * double(i) * 0.25 + double(me) * 0x1p-30;
    comm.all_reduce(d.data(), n, reduce_op::sum);
    bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += d[i] != tri * double(i) * 0.25 + tri0 * 0x1p-30;
    CHECK(bad == 0);

    // fp64 max: rank (7i) mod W holds (i + 1)·1e290 (beyond fp32), the others -(q + 1)·i - 1.
    for (std::size_t i = 0; i < n; ++i)
      d[i] = std::size_t(me) == (7 * i) % std::size_t(W) ? (double(i) + 1) * 1e290 : -double(me + 1) * double(i) - 1;
    comm.all_reduce(d.data(), n, reduce_op::max);
    bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += d[i] != (double(i) + 1) * 1e290;
    CHECK(bad == 0);
  }

  // The maximum of rank-dependent negatives is rank 0's.
  double m = -1.0 - double(me);
  comm.all_reduce(&m, 1, reduce_op::max);
  CHECK(m == -1.0);
}

TEST_CASE("mpi: all_reduce of zero elements touches nothing") {
  mpopt::comm::mpi comm;
  INFO(rank_tag());
  float f[2] = {1.5f + float(comm.rank()), -2.0f};
  comm.all_reduce(f, 0, reduce_op::sum);
  CHECK(f[0] == 1.5f + float(comm.rank()));
  CHECK(f[1] == -2.0f);
  comm.all_reduce(static_cast<double*>(nullptr), 0, reduce_op::max);
  // Not even a 16-bit type is refused when there is nothing to reduce.
  bf16_t b = bf16_t::from_bits(0x3f80);
  comm.all_reduce(&b, 0, reduce_op::sum);
  CHECK(b.bits == 0x3f80);
  // The collectives still line up afterwards.
  double s = 1.0;
  comm.all_reduce(&s, 1, reduce_op::sum);
  CHECK(s == double(comm.size()));
}

namespace {

// Rank `me` sends f(me, j) for j in [0, total); receives, for its block at offset o, sum over q of f(q, o + k).
// f(q, j) = 1000·q + j + 0.25 is exact in fp32 and fp64 here; the sum is 1000·W(W-1)/2 + W·(j + 0.25).
template <class T>
void check_reduce_scatter(mpopt::comm::mpi& comm, const std::vector<std::size_t>& counts) {
  const int me = comm.rank(), W = comm.size();
  const std::vector<std::size_t> d = displacements(counts);
  const std::size_t total = d.back(), mine = counts[std::size_t(me)];
  INFO(rank_tag() << " counts[me] " << mine << " total " << total << " type " << mpopt::dtype_name<T>());
  std::vector<T> send(total);
  for (std::size_t j = 0; j < total; ++j) send[j] = T(1000.0 * me + double(j) + 0.25);
  const std::vector<T> send_copy = send;
  const T sentinel = T(-12345.5);
  std::vector<T> recv(mine + 3, sentinel);  // three past the end must stay untouched
  comm.reduce_scatter(send.data(), recv.data(), counts, reduce_op::sum);
  std::size_t bad = 0;
  for (std::size_t k = 0; k < mine; ++k) {
    const double j = double(d[std::size_t(me)] + k);
    bad += recv[k] != T(1000.0 * double(W) * double(W - 1) / 2 + double(W) * (j + 0.25));
  }
  CHECK(bad == 0);
  for (std::size_t k = mine; k < mine + 3; ++k) CHECK(recv[k] == sentinel);
  CHECK(send == send_copy);  // the send buffer is input only

  // max: the largest rank's values.
  std::fill(recv.begin(), recv.end(), sentinel);
  comm.reduce_scatter(send.data(), recv.data(), counts, reduce_op::max);
  bad = 0;
  for (std::size_t k = 0; k < mine; ++k) bad += recv[k] != T(1000.0 * (W - 1) + double(d[std::size_t(me)] + k) + 0.25);
  CHECK(bad == 0);
  for (std::size_t k = mine; k < mine + 3; ++k) CHECK(recv[k] == sentinel);
}

}  // namespace

TEST_CASE("mpi: reduce_scatter with equal and unequal counts, zeros included") {
  mpopt::comm::mpi comm;
  const std::size_t W = std::size_t(comm.size());
  for (std::size_t c : {std::size_t(1), std::size_t(5), std::size_t(4096)}) {
    const std::vector<std::size_t> equal(W, c);
    check_reduce_scatter<float>(comm, equal);
    check_reduce_scatter<double>(comm, equal);
  }
  std::vector<std::size_t> uneven(W);
  for (std::size_t r = 0; r < W; ++r) uneven[r] = r % 2 ? 0 : r + 3;
  check_reduce_scatter<float>(comm, uneven);
  check_reduce_scatter<double>(comm, uneven);
  // Rank 0 gets nothing, the others different amounts.
  for (std::size_t r = 0; r < W; ++r) uneven[r] = r == 0 ? 0 : 1000 * r + 1;
  check_reduce_scatter<float>(comm, uneven);
  check_reduce_scatter<double>(comm, uneven);
  // Nothing at all.
  check_reduce_scatter<double>(comm, std::vector<std::size_t>(W, 0));
}

namespace {

// In-place all_gather: rank r's block (at the offset of counts[0..r)) holds its own values; everything else starts
// as junk and must end as the owners' values, bit for bit.
template <class T, class Bits, class Make>
void check_all_gather(mpopt::comm::mpi& comm, const std::vector<std::size_t>& counts, Make make_bits) {
  const int me = comm.rank();
  const std::vector<std::size_t> d = displacements(counts);
  INFO(rank_tag() << " total " << d.back() << " type " << mpopt::dtype_name<T>());
  std::vector<Bits> want(d.back() + 2);
  for (std::size_t r = 0; r < counts.size(); ++r) {
    for (std::size_t k = 0; k < counts[r]; ++k) want[d[r] + k] = make_bits(int(r), k);
  }
  want[d.back()] = Bits(0x5a5a);  // past the end: untouched
  want[d.back() + 1] = Bits(0xa5a5);
  std::vector<T> buf(want.size());
  for (std::size_t i = 0; i < buf.size(); ++i) {
    const bool own = i >= d[std::size_t(me)] && i < d[std::size_t(me) + 1];
    const Bits b = own || i >= d.back() ? want[i] : Bits(0x3c3c);  // junk elsewhere
    std::memcpy(&buf[i], &b, sizeof b);
  }
  comm.all_gather(buf.data(), counts);
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < buf.size(); ++i) {
    Bits b;
    std::memcpy(&b, &buf[i], sizeof b);
    if (b != want[i] && bad++ == 0) first_bad = i;
  }
  CHECK_MESSAGE(bad == 0, bad << " wrong, first at " << first_bad);
}

std::vector<std::size_t> gather_counts(std::size_t W, int shape) {
  std::vector<std::size_t> c(W);
  for (std::size_t r = 0; r < W; ++r) {
    switch (shape) {
      case 0: c[r] = r == 1 ? 0 : 2 * r + 9; break;  // a zero on rank 1
      case 1: c[r] = r; break;                       // a zero on rank 0
      case 2: c[r] = 4096 + r; break;
      default: c[r] = 0; break;
    }
  }
  return c;
}

}  // namespace

TEST_CASE("mpi: all_gather in place with unequal counts, fp32, fp64, bf16 and fp16 bit patterns") {
  mpopt::comm::mpi comm;
  const std::size_t W = std::size_t(comm.size());
  for (int shape = 0; shape < 4; ++shape) {
    CAPTURE(shape);
    const auto counts = gather_counts(W, shape);
    // fp32: NaN payloads and -0 must survive (they travel as bytes).
    check_all_gather<float, std::uint32_t>(comm, counts, [](int r, std::size_t k) {
      return k % 3 == 0 ? std::uint32_t(0x7fc00001u + std::uint32_t(r) * 16u + std::uint32_t(k))
                        : bits_of(float(r) * 100.0f + float(k) + (k % 3 == 1 ? 0.5f : -0.0f));
    });
    check_all_gather<double, std::uint64_t>(comm, counts, [](int r, std::size_t k) {
      return (std::uint64_t(r + 1) << 52) ^ (std::uint64_t(k) * 0x9e3779b97f4a7c15ull);
    });
    check_all_gather<bf16_t, std::uint16_t>(comm, counts, pattern16);
    check_all_gather<half_t, std::uint16_t>(comm, counts, pattern16);
  }
}

TEST_CASE("mpi: broadcast from the last rank") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), root = comm.size() - 1;
  INFO(rank_tag());
  std::vector<double> d(777);
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = me == root ? double(i) * 1.5 - 7.0 : -1.0;
  comm.broadcast(d.data(), d.size(), root);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < d.size(); ++i) bad += d[i] != double(i) * 1.5 - 7.0;
  CHECK(bad == 0);

  std::vector<bf16_t> b(33);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = bf16_t::from_bits(me == root ? pattern16(root, i) : 0);
  comm.broadcast(b.data(), b.size(), root);
  bad = 0;
  for (std::size_t i = 0; i < b.size(); ++i) bad += b[i].bits != pattern16(root, i);
  CHECK(bad == 0);

  // Zero elements: nothing moves.
  float f = float(me);
  comm.broadcast(&f, 0, root);
  CHECK(f == float(me));
  // And from rank 0 as well.
  int v = me == 0 ? 42 : -1;
  float fv = float(v);
  comm.broadcast(&fv, 1, 0);
  CHECK(fv == 42.0f);
}

TEST_CASE("mpi: barrier holds every rank until the last arrives") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  using clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC: one clock for the processes of one host
  comm.barrier();
  // The last rank arrives late; nobody may leave before it arrived.
  if (me == W - 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const double arrive = std::chrono::duration<double>(clock::now().time_since_epoch()).count();
  comm.barrier();
  const double leave = std::chrono::duration<double>(clock::now().time_since_epoch()).count();
  double last_arrival = arrive;
  MPI_Allreduce(MPI_IN_PLACE, &last_arrival, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  CHECK(leave >= last_arrival);
  // The barrier is not traffic.
  CHECK(comm.traffic_so_far().calls == 0);
}

TEST_CASE("mpi: reductions of 16-bit types are refused, naming the type") {
  mpopt::comm::mpi comm;
  const std::size_t W = std::size_t(comm.size());
  INFO(rank_tag());
  std::vector<bf16_t> b(8, bf16_t(1.0f));
  CHECK_THROWS_WITH_AS(comm.all_reduce(b.data(), b.size(), reduce_op::sum), doctest::Contains("bf16"), mpopt::error);
  CHECK_THROWS_WITH_AS(comm.all_reduce(b.data(), b.size(), reduce_op::max), doctest::Contains("bf16"), mpopt::error);
  std::vector<half_t> h(8, half_t(1.0f));
  CHECK_THROWS_WITH_AS(comm.all_reduce(h.data(), h.size(), reduce_op::sum), doctest::Contains("fp16"), mpopt::error);
  std::vector<bf16_t> send(W * 2, bf16_t(1.0f)), recv(2);
  CHECK_THROWS_WITH_AS(comm.reduce_scatter(send.data(), recv.data(), std::vector<std::size_t>(W, 2), reduce_op::sum),
                       doctest::Contains("bf16"), mpopt::error);
  try {
    comm.all_reduce(b.data(), b.size(), reduce_op::sum);
    FAIL("no throw");
  } catch (const mpopt::error& e) {
    CHECK(e.code() == mpopt::errc::unsupported);
    CHECK(std::string(e.what()).find("all_reduce") != std::string::npos);
  }
  // The buffer is left as it was, and the communicator still works.
  for (const bf16_t& x : b) CHECK(x.bits == bf16_t(1.0f).bits);
  double s = 2.0;
  comm.all_reduce(&s, 1, reduce_op::sum);
  CHECK(s == 2.0 * double(W));
}

TEST_CASE("mpi: typed overloads refuse a counts vector of the wrong length") {
  mpopt::comm::mpi comm;
  const std::size_t W = std::size_t(comm.size());
  INFO(rank_tag());
  std::vector<float> a(64, 1.0f), r(64, 0.0f);
  CHECK_THROWS_WITH_AS(comm.reduce_scatter(a.data(), r.data(), std::vector<std::size_t>(W + 1, 1), reduce_op::sum),
                       doctest::Contains("counts"), mpopt::error);
  CHECK_THROWS_AS(comm.reduce_scatter(a.data(), r.data(), std::vector<std::size_t>{}, reduce_op::sum), mpopt::error);
  CHECK_THROWS_WITH_AS(comm.all_gather(a.data(), std::vector<std::size_t>(W + 2, 1)), doctest::Contains("all_gather"),
                       mpopt::error);
  if (W > 1) {
    CHECK_THROWS_AS(comm.all_gather(a.data(), std::vector<std::size_t>(W - 1, 1)), mpopt::error);
  }
  // Nothing was counted or changed, and the right length works.
  CHECK(comm.traffic_so_far().calls == 0);
  for (float x : r) CHECK(x == 0.0f);
  CHECK_NOTHROW(comm.all_gather(a.data(), std::vector<std::size_t>(W, 1)));
}

TEST_CASE("mpi: traffic counters follow the ring accounting") {
  mpopt::comm::mpi comm;
  const int me = comm.rank(), W = comm.size();
  INFO(rank_tag());
  const std::size_t n = 1000;
  std::vector<std::size_t> rs(static_cast<std::size_t>(W)), ag(static_cast<std::size_t>(W));
  for (int r = 0; r < W; ++r) {
    rs[std::size_t(r)] = r % 2 ? 0 : std::size_t(r) + 3;
    ag[std::size_t(r)] = 10 * std::size_t(r) + 1;
  }
  const std::vector<std::size_t> rsd = displacements(rs), agd = displacements(ag);
  const std::size_t m = rsd.back(), k = agd.back();

  // Some traffic first, so the reset is what zeroes it.
  double warm = 1.0;
  comm.all_reduce(&warm, 1, reduce_op::sum);
  CHECK(comm.traffic_so_far().calls == 1);
  comm.reset_traffic();
  CHECK(comm.traffic_so_far().calls == 0);
  CHECK(comm.traffic_so_far().elements == 0.0);
  CHECK(comm.traffic_so_far().bytes == 0.0);

  std::vector<float> f(n, 1.0f);
  comm.all_reduce(f.data(), n, reduce_op::sum);
  std::vector<double> send(m, 1.0), recv(rs[std::size_t(me)] + 1);
  comm.reduce_scatter(send.data(), recv.data(), rs, reduce_op::sum);
  std::vector<bf16_t> g(k, bf16_t(0.0f));
  comm.all_gather(g.data(), ag);

  const double share = double(W - 1) / double(W);
  const mpopt::comm::traffic t = comm.traffic_so_far();
  CHECK(t.calls == 3);
  CHECK(t.elements == doctest::Approx(share * double(2 * n + m + k)).epsilon(1e-12));
  CHECK(t.bytes == doctest::Approx(share * double(2 * n * 4 + m * 8 + k * 2)).epsilon(1e-12));
  if (W == 1) {
    CHECK(t.elements == 0.0);
    CHECK(t.bytes == 0.0);
  } else {
    CHECK(t.elements > 0.0);
  }
  // A broadcast of c elements adds (W-1)/W·c; a barrier adds nothing.
  comm.broadcast(f.data(), 100, 0);
  comm.barrier();
  CHECK(comm.traffic_so_far().calls == 4);
  CHECK(comm.traffic_so_far().elements == doctest::Approx(share * double(2 * n + m + k + 100)).epsilon(1e-12));
  CHECK(comm.traffic_so_far().bytes == doctest::Approx(share * double(2 * n * 4 + m * 8 + k * 2 + 400)).epsilon(1e-12));
  // The collectives themselves were right too.
  std::size_t bad = 0;
  for (float x : f) bad += x != float(W);
  CHECK(bad == 0);
  for (std::size_t i = 0; i < rs[std::size_t(me)]; ++i) CHECK(recv[i] == double(W));
}

TEST_CASE("single_rank: copies and no-ops, root 0 only") {
  mpopt::comm::single_rank one;
  CHECK(one.rank() == 0);
  CHECK(one.size() == 1);
  CHECK(one.memory() == mpopt::comm::memory_space::host);
  CHECK(one.name() == "single-rank");

  // reduce_scatter copies its one block.
  std::vector<double> send = {1.5, -2.0, 3.25, 7.0, 9.0}, recv(6, -1.0);
  one.reduce_scatter(send.data(), recv.data(), std::vector<std::size_t>{5}, reduce_op::sum);
  CHECK(recv == std::vector<double>{1.5, -2.0, 3.25, 7.0, 9.0, -1.0});
  // 16-bit blocks too (a copy, not arithmetic), bit for bit.
  std::vector<bf16_t> bs(4), br(4, bf16_t::from_bits(0));
  for (std::size_t i = 0; i < 4; ++i) bs[i] = bf16_t::from_bits(pattern16(0, i));
  one.reduce_scatter(bs.data(), br.data(), std::vector<std::size_t>{3}, reduce_op::max);
  for (std::size_t i = 0; i < 3; ++i) CHECK(br[i].bits == pattern16(0, i));
  CHECK(br[3].bits == 0);
  // In place, and zero elements.
  one.reduce_scatter(send.data(), send.data(), std::vector<std::size_t>{5}, reduce_op::sum);
  CHECK(send == std::vector<double>{1.5, -2.0, 3.25, 7.0, 9.0});
  one.reduce_scatter(send.data(), recv.data() + 5, std::vector<std::size_t>{0}, reduce_op::sum);
  CHECK(recv[5] == -1.0);

  // all_reduce, all_gather and broadcast from root 0 leave the data as it is.
  std::vector<float> f = {1.0f, -0.0f, 3.5f};
  one.all_reduce(f.data(), f.size(), reduce_op::sum);
  one.all_gather(f.data(), std::vector<std::size_t>{3});
  one.broadcast(f.data(), f.size(), 0);
  one.barrier();
  CHECK(bits_of(f[0]) == bits_of(1.0f));
  CHECK(bits_of(f[1]) == bits_of(-0.0f));
  CHECK(bits_of(f[2]) == bits_of(3.5f));

  CHECK_THROWS_WITH_AS(one.broadcast(f.data(), f.size(), 1), doctest::Contains("root 1"), mpopt::error);
  CHECK_THROWS_AS(one.broadcast(f.data(), f.size(), -1), mpopt::error);
  CHECK_THROWS_WITH_AS(one.reduce_scatter(send.data(), recv.data(), std::vector<std::size_t>{1, 1}, reduce_op::sum),
                       doctest::Contains("counts"), mpopt::error);
  CHECK_THROWS_AS(one.all_gather(f.data(), std::vector<std::size_t>{}), mpopt::error);
  // One rank moves nothing over the wire.
  CHECK(one.traffic_so_far().elements == 0.0);
  CHECK(one.traffic_so_far().bytes == 0.0);
}
