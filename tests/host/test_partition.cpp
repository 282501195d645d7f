// ZeRO partition math (mpopt/zero/partition.hpp) against brute force: shard sizes from a search over multiples of
// the alignment, ownership from walking the elements rank by rank, fragments and grid segments from per-element
// recomputation. Also the property the deterministic reductions rest on: the per-rank owned ranges' grid segments,
// concatenated in rank order, are the single-rank segments of the whole group.
#include <doctest/doctest.h>

#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include "mpopt/error.hpp"
#include "mpopt/zero/partition.hpp"

namespace {

using mpopt::zero::fragment;
using mpopt::zero::partition;
using mpopt::zero::range;
using mpopt::zero::segment;

constexpr std::size_t A = 4096;

const std::vector<std::size_t> kSizes = {0,     1,         7,         4095,       4096,      4097,      8191,
                                         8192,  8193,      3 * A + 5, 4 * A - 1,  4 * A,     4 * A + 1, 8 * A - 3,
                                         8 * A, 8 * A + 1, 100000,    12 * A + 1, 9 * A - 1, 24 * A,    24 * A + 7};
const std::vector<int> kWorlds = {1, 2, 3, 4, 8};

// The smallest multiple of `align` whose W copies hold `size` elements, by search (W > 1); `size` itself at W = 1.
std::size_t reference_shard(std::size_t size, int world, std::size_t align) {
  if (world == 1) return size;
  std::size_t s = 0;
  while (s * std::size_t(world) < size) s += align;
  return s;
}

// Ownership by walking the group rank by rank: rank r takes the next `shard` elements (or what is left).
struct walk {
  std::vector<int> owner;             // per element
  std::vector<std::size_t> in_shard;  // the element's position inside its rank's shard
  std::vector<std::size_t> owned;     // elements per rank
};

walk walk_elements(std::size_t size, int world, std::size_t shard) {
  walk w;
  w.owner.assign(size, -1);
  w.in_shard.assign(size, 0);
  w.owned.assign(std::size_t(world), 0);
  std::size_t i = 0;
  for (int r = 0; r < world; ++r) {
    for (std::size_t j = 0; j < shard && i < size; ++j, ++i) {
      w.owner[i] = r;
      w.in_shard[i] = j;
      ++w.owned[std::size_t(r)];
    }
  }
  REQUIRE(i == size);  // the shards hold the group
  return w;
}

// The tensor holding element i, by scanning every tensor; offsets.size() unless exactly one holds it.
std::size_t tensor_of(const std::vector<std::size_t>& offsets, std::size_t i) {
  std::size_t found = offsets.size(), hits = 0;
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    if (offsets[t] <= i && i < offsets[t + 1]) {
      found = t;
      ++hits;
    }
  }
  return hits == 1 ? found : offsets.size();
}

// The segments of r by walking its elements: a new segment starts at r.begin, at every multiple of `block` and at
// every change of tensor.
std::vector<segment> reference_segments(range r, const std::vector<std::size_t>& offsets, std::size_t block) {
  std::vector<segment> out;
  std::size_t homeless = 0;
  for (std::size_t i = r.begin; i < r.end; ++i) {
    const std::size_t t = tensor_of(offsets, i);
    homeless += t == offsets.size();
    if (out.empty() || i % block == 0 || out.back().tensor != t) {
      out.push_back({i, i + 1, t});
    } else {
      ++out.back().end;
    }
  }
  REQUIRE(homeless == 0);  // the layouts are well formed: every element in exactly one tensor
  return out;
}

std::string describe(const std::vector<segment>& s) {
  std::string out;
  for (const segment& x : s) {
    out += "[" + std::to_string(x.begin) + "," + std::to_string(x.end) + ")t" + std::to_string(x.tensor) + " ";
  }
  return out;
}

std::string describe(const std::vector<std::size_t>& v) {
  std::string out;
  for (std::size_t x : v) out += std::to_string(x) + " ";
  return out;
}

bool same_segments(const std::vector<segment>& a, const std::vector<segment>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t k = 0; k < a.size(); ++k) {
    if (a[k].begin != b[k].begin || a[k].end != b[k].end || a[k].tensor != b[k].tensor) return false;
  }
  return true;
}

// Offsets (tensors + 1 entries, from 0) of tensors with the given sizes.
std::vector<std::size_t> offsets_of(const std::vector<std::size_t>& sizes) {
  std::vector<std::size_t> off{0};
  for (std::size_t s : sizes) off.push_back(off.back() + s);
  return off;
}

// Random tensor sizes: some zero, some small, some spanning several 4096 blocks.
std::vector<std::size_t> random_tensor_sizes(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> n_dist(1, 12), kind(0, 9);
  std::vector<std::size_t> sizes(std::size_t(n_dist(rng)));
  for (std::size_t& s : sizes) {
    const int k = kind(rng);
    if (k < 2) {
      s = 0;
    } else if (k < 6) {
      s = std::uniform_int_distribution<std::size_t>(1, 300)(rng);
    } else if (k < 9) {
      s = std::uniform_int_distribution<std::size_t>(1, 6000)(rng);
    } else {
      s = std::uniform_int_distribution<std::size_t>(3 * A, 5 * A + 17)(rng);
    }
  }
  return sizes;
}

// Hand-built tensor layouts: zero-sized tensors first, last and between; tensors straddling shard boundaries;
// one spanning three or more shards at W = 4.
const std::vector<std::vector<std::size_t>> kLayouts = {
    {},
    {0},
    {0, 0},
    {5},
    {0, 5, 0},
    {4096},
    {4095, 2, 4095},
    {0, 3, 0, 4096 + 10, 0, 7, 3 * 4096 + 100, 0},
    {100, 3 * 4096 + 1, 0, 50},
    {10, 5 * 4096 + 3000, 1, 0, 4096, 2 * 4096 - 1, 0},
    {1, 1, 1, 1, 1, 1, 1},
    {4096, 0, 4096, 0, 4096, 0, 4096, 1},
    {9 * 4096 + 11},
};

void check_partition(std::size_t size, int world) {
  CAPTURE(size);
  CAPTURE(world);
  const partition p = mpopt::zero::make_partition(size, world);
  REQUIRE(p.size == size);
  REQUIRE(p.world == world);
  CHECK(p.shard == reference_shard(size, world, A));
  if (world == 1) {
    CHECK(p.shard == size);
  } else {
    CHECK(p.shard % A == 0);
    const std::size_t per_rank = (size + std::size_t(world) - 1) / std::size_t(world);
    CHECK(p.shard >= per_rank);
    if (p.shard > 0) CHECK(p.shard - A < per_rank);  // minimal: one block less would not hold the group
  }
  CHECK(p.shard * std::size_t(world) >= size);
  CHECK(p.padded_size() == p.shard * std::size_t(world));

  const walk w = walk_elements(size, world, p.shard);

  // Owned ranges tile [0, size) in rank order, each the rank's walked elements; padding fills the shard.
  std::size_t next = 0, total_padding = 0;
  for (int r = 0; r < world; ++r) {
    CAPTURE(r);
    const range o = p.owned(r);
    CHECK(o.begin == next);
    CHECK(o.begin <= o.end);
    CHECK(o.size() == w.owned[std::size_t(r)]);
    for (std::size_t i = o.begin; i < o.end && i < size; ++i) {
      if (w.owner[i] != r) {
        FAIL_CHECK("element " << i << " owned by " << r << " but walked to " << w.owner[i]);
        break;
      }
    }
    CHECK(p.padding(r) == p.shard - w.owned[std::size_t(r)]);
    total_padding += p.padding(r);
    next = o.end;
  }
  CHECK(next == size);
  CHECK(total_padding + size == p.padded_size());

  // owner(i) for every element.
  std::size_t wrong = 0, first_wrong = 0;
  for (std::size_t i = 0; i < size; ++i) {
    if (p.owner(i) != w.owner[i] && wrong++ == 0) first_wrong = i;
  }
  CHECK_MESSAGE(wrong == 0, "first wrong owner at " << first_wrong);

  // counts over the whole group and over random ranges, against per-element counting.
  auto brute_counts = [&](range r) {
    std::vector<std::size_t> c(std::size_t(world), 0);
    for (std::size_t i = r.begin; i < r.end; ++i) ++c[std::size_t(w.owner[i])];
    return c;
  };
  CHECK(p.counts() == brute_counts({0, size}));
  CHECK(p.counts() == w.owned);
  std::mt19937_64 rng(size * 131 + std::size_t(world));
  std::uniform_int_distribution<std::size_t> pos(0, size);
  for (int k = 0; k < 40; ++k) {
    std::size_t a = pos(rng), b = pos(rng);
    if (a > b) std::swap(a, b);
    if (k == 0) a = b;  // an empty range
    CAPTURE(a);
    CAPTURE(b);
    const std::vector<std::size_t> c = p.counts({a, b});
    CHECK(c == brute_counts({a, b}));
  }
}

}  // namespace

TEST_CASE("make_partition: shard sizes, owned ranges, padding, owner and counts against brute force") {
  for (int world : kWorlds) {
    for (std::size_t size : kSizes) check_partition(size, world);
  }
  // A few more world sizes and random sizes.
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::size_t> sz(0, 60000);
  for (int world : {5, 6, 7, 16}) {
    for (int k = 0; k < 4; ++k) check_partition(sz(rng), world);
  }
  // Fewer elements than ranks: the first rank owns them all, the others are all padding.
  const partition p = mpopt::zero::make_partition(3, 8);
  CHECK(p.shard == A);
  CHECK(p.owned(0) == range{0, 3});
  for (int r = 1; r < 8; ++r) {
    CHECK(p.owned(r).empty());
    CHECK(p.padding(r) == A);
  }
}

TEST_CASE("make_partition: other alignments against a search over multiples") {
  for (std::size_t align : {std::size_t(1), std::size_t(3), std::size_t(16), std::size_t(1000)}) {
    for (int world : {2, 3, 5}) {
      for (std::size_t size : {std::size_t(0), std::size_t(1), std::size_t(10), std::size_t(2999), std::size_t(3001),
                               std::size_t(12345)}) {
        CAPTURE(align);
        CAPTURE(world);
        CAPTURE(size);
        const partition p = mpopt::zero::make_partition(size, world, align);
        CHECK(p.shard == reference_shard(size, world, align));
        CHECK(p.shard % align == 0);
      }
    }
  }
  // With one rank the alignment does not matter: the shard is the group.
  CHECK(mpopt::zero::make_partition(12345, 1, 1000).shard == 12345);
}

TEST_CASE("make_partition: world and alignment errors name the argument and the value") {
  CHECK_THROWS_WITH_AS(mpopt::zero::make_partition(100, 0), doctest::Contains("world"), mpopt::error);
  CHECK_THROWS_WITH_AS(mpopt::zero::make_partition(100, 0), doctest::Contains("got 0"), mpopt::error);
  CHECK_THROWS_WITH_AS(mpopt::zero::make_partition(100, -3), doctest::Contains("-3"), mpopt::error);
  CHECK_THROWS_WITH_AS(mpopt::zero::make_partition(100, 2, 0), doctest::Contains("alignment"), mpopt::error);
  CHECK_THROWS_WITH_AS(mpopt::zero::make_partition(100, 2, 0), doctest::Contains("0"), mpopt::error);
  try {
    (void)mpopt::zero::make_partition(5, 0);
    FAIL("no throw");
  } catch (const mpopt::error& e) {
    CHECK(e.code() == mpopt::errc::invalid_argument);
    const std::string what = e.what();
    CHECK(what.find("world") != std::string::npos);
    CHECK(what.find('0') != std::string::npos);
  }
  try {
    (void)mpopt::zero::make_partition(5, 4, 0);
    FAIL("no throw");
  } catch (const mpopt::error& e) {
    CHECK(e.code() == mpopt::errc::invalid_argument);
    CHECK(std::string(e.what()).find("alignment") != std::string::npos);
  }
  // A valid call does not throw, world 1 with alignment 1 included.
  CHECK_NOTHROW((void)mpopt::zero::make_partition(0, 1, 1));
}

namespace {

void check_fragments(const std::vector<std::size_t>& offsets, int world) {
  const std::size_t size = offsets.back();
  CAPTURE(world);
  CAPTURE(size);
  INFO("offsets: " << describe(offsets));
  const partition p = mpopt::zero::make_partition(size, world);
  const walk w = walk_elements(size, world, p.shard);
  const std::vector<fragment> frags = mpopt::zero::fragments(p, offsets);
  const std::size_t tensors = offsets.size() - 1;

  std::vector<int> cover(size, 0);
  std::size_t bad = 0;
  for (std::size_t k = 0; k < frags.size(); ++k) {
    const fragment& f = frags[k];
    CAPTURE(k);
    REQUIRE(f.tensor < tensors);
    const std::size_t tsize = offsets[f.tensor + 1] - offsets[f.tensor];
    CHECK(tsize > 0);  // no fragment for a zero-sized tensor
    CHECK(f.count > 0);
    REQUIRE(f.tensor_offset + f.count <= tsize);
    REQUIRE(f.rank >= 0);
    REQUIRE(f.rank < world);
    CHECK(f.shard_offset + f.count <= p.shard);
    if (k > 0) {  // by tensor, then rank
      const fragment& g = frags[k - 1];
      CHECK((g.tensor < f.tensor || (g.tensor == f.tensor && g.rank < f.rank)));
    }
    for (std::size_t j = 0; j < f.count; ++j) {
      const std::size_t i = offsets[f.tensor] + f.tensor_offset + j;
      ++cover[i];
      if (w.owner[i] != f.rank || w.in_shard[i] != f.shard_offset + j) ++bad;
    }
  }
  CHECK_MESSAGE(bad == 0, bad << " fragment elements with the wrong rank or shard offset");
  std::size_t uncovered = 0, twice = 0;
  for (int c : cover) {
    uncovered += c == 0;
    twice += c > 1;
  }
  CHECK(uncovered == 0);
  CHECK(twice == 0);

  // And the fragment count: one per (tensor, rank) that share an element.
  std::size_t expected = 0;
  for (std::size_t t = 0; t < tensors; ++t) {
    std::vector<bool> seen(std::size_t(world), false);
    for (std::size_t i = offsets[t]; i < offsets[t + 1]; ++i) seen[std::size_t(w.owner[i])] = true;
    for (bool s : seen) expected += s;
  }
  CHECK(frags.size() == expected);
}

}  // namespace

TEST_CASE("fragments: every tensor element in exactly one fragment, with its rank and shard offset") {
  for (int world : kWorlds) {
    for (const auto& layout : kLayouts) check_fragments(offsets_of(layout), world);
  }
  std::mt19937_64 rng(11);
  for (int k = 0; k < 60; ++k) {
    const auto layout = random_tensor_sizes(rng);
    for (int world : kWorlds) check_fragments(offsets_of(layout), world);
  }

  // The layouts the hand-built cases are for, spelled out at W = 4.
  {
    // 12439 elements: ceil(12439 / 4) = 3110 rounds up to a shard of 4096, so the big tensor spans ranks 0..3.
    const auto off = offsets_of({100, 3 * 4096 + 1, 0, 50});
    const partition p = mpopt::zero::make_partition(off.back(), 4);
    REQUIRE(p.shard == 4096);
    const auto f = mpopt::zero::fragments(p, off);
    REQUIRE(f.size() == 6);
    // tensor 0 on rank 0
    CHECK(
        (f[0].tensor == 0 && f[0].rank == 0 && f[0].tensor_offset == 0 && f[0].shard_offset == 0 && f[0].count == 100));
    // tensor 1 on ranks 0, 1, 2, 3
    CHECK((f[1].tensor == 1 && f[1].rank == 0 && f[1].tensor_offset == 0 && f[1].shard_offset == 100 &&
           f[1].count == 3996));
    CHECK((f[2].tensor == 1 && f[2].rank == 1 && f[2].tensor_offset == 3996 && f[2].shard_offset == 0 &&
           f[2].count == 4096));
    CHECK((f[3].tensor == 1 && f[3].rank == 2 && f[3].tensor_offset == 8092 && f[3].shard_offset == 0 &&
           f[3].count == 4096));
    CHECK((f[4].tensor == 1 && f[4].rank == 3 && f[4].tensor_offset == 12188 && f[4].shard_offset == 0 &&
           f[4].count == 101));
    // tensor 2 is empty; tensor 3 on rank 3
    CHECK((f[5].tensor == 3 && f[5].rank == 3 && f[5].tensor_offset == 0 && f[5].shard_offset == 101 &&
           f[5].count == 50));
  }
  // No tensors, or only zero-sized ones: no fragments.
  CHECK(mpopt::zero::fragments(mpopt::zero::make_partition(0, 3), {0}).empty());
  CHECK(mpopt::zero::fragments(mpopt::zero::make_partition(0, 3), {0, 0, 0}).empty());
  // One rank: each non-empty tensor is one fragment at its own offset.
  {
    const auto off = offsets_of({3, 0, 5000, 1});
    const auto f = mpopt::zero::fragments(mpopt::zero::make_partition(off.back(), 1), off);
    REQUIRE(f.size() == 3);
    CHECK((f[0].tensor == 0 && f[0].shard_offset == 0 && f[0].count == 3));
    CHECK((f[1].tensor == 2 && f[1].shard_offset == 3 && f[1].count == 5000));
    CHECK((f[2].tensor == 3 && f[2].shard_offset == 5003 && f[2].count == 1));
  }
}

namespace {

void check_segments(range r, const std::vector<std::size_t>& offsets, std::size_t block) {
  CAPTURE(r.begin);
  CAPTURE(r.end);
  CAPTURE(block);
  INFO("offsets: " << describe(offsets));
  const std::vector<segment> s = mpopt::zero::grid_segments(r, offsets, block);
  INFO("segments: " << describe(s));
  // They tile r in order, each inside one tensor and one block.
  std::size_t next = r.begin;
  for (const segment& x : s) {
    CHECK(x.begin == next);
    CHECK(x.begin < x.end);
    REQUIRE(x.tensor + 1 < offsets.size());
    CHECK(offsets[x.tensor] <= x.begin);
    CHECK(x.end <= offsets[x.tensor + 1]);
    CHECK(x.begin / block == (x.end - 1) / block);
    CHECK(x.tensor == tensor_of(offsets, x.begin));
    next = x.end;
  }
  CHECK(next == r.end);
  // And they are the walked segments exactly (each as long as the tensor and the grid allow).
  CHECK(same_segments(s, reference_segments(r, offsets, block)));
}

}  // namespace

TEST_CASE("grid_segments: tile the range, split at tensors and the grid, against a per-element walk") {
  std::mt19937_64 rng(23);
  std::vector<std::vector<std::size_t>> layouts = kLayouts;
  for (int k = 0; k < 30; ++k) layouts.push_back(random_tensor_sizes(rng));
  for (const auto& layout : layouts) {
    const auto off = offsets_of(layout);
    const std::size_t size = off.back();
    std::uniform_int_distribution<std::size_t> pos(0, size);
    check_segments({0, size}, off, A);
    check_segments({0, size}, off, 7);
    for (int k = 0; k < 10; ++k) {
      // Arbitrary ranges.
      std::size_t a = pos(rng), b = pos(rng);
      if (a > b) std::swap(a, b);
      check_segments({a, b}, off, A);
      check_segments({a, b}, off, 64);
      // Ranges starting on the grid.
      const std::size_t g = (a / A) * A;
      check_segments({g, b}, off, A);
    }
    check_segments({size, size}, off, A);
  }
}

TEST_CASE("grid_segments: the owned ranges' segments, concatenated in rank order, are the group's segments") {
  std::mt19937_64 rng(31);
  std::vector<std::vector<std::size_t>> layouts = kLayouts;
  for (int k = 0; k < 40; ++k) layouts.push_back(random_tensor_sizes(rng));
  // One tensor per size of the partition test, so every shard shape is seen.
  for (std::size_t size : kSizes) layouts.push_back({size});
  for (const auto& layout : layouts) {
    const auto off = offsets_of(layout);
    const std::size_t size = off.back();
    const std::vector<segment> whole = mpopt::zero::grid_segments({0, size}, off, A);
    for (int world : {1, 2, 3, 4, 5, 8}) {
      CAPTURE(world);
      INFO("offsets: " << describe(off));
      const partition p = mpopt::zero::make_partition(size, world);
      std::vector<segment> joined;
      for (int r = 0; r < world; ++r) {
        const std::vector<segment> part = mpopt::zero::grid_segments(p.owned(r), off, A);
        joined.insert(joined.end(), part.begin(), part.end());
      }
      CHECK(same_segments(joined, whole));
    }
  }
}
