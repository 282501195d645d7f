// ZeRO partition math: how one parameter group's flat buffer is split into equal per-rank shards.
//
// A group of `size` elements on W ranks gets shards of `shard` elements each, `shard` = ceil(size / W) rounded up
// to a multiple of `shard_alignment` (4096 elements); rank r owns [r·shard, (r+1)·shard) ∩ [0, size), and the rest
// of its shard is padding (zero, never communicated, never written to the caller). Why 4096: it is the block of the
// host's deterministic reductions (host::reduce_block), so every shard starts on a block boundary and the
// grad-norm and LAMB partial sums of a sharded run are the single-rank sums, bit for bit, at every world size;
// it is also a multiple of 16 bytes for every element type, as vector loads and NCCL want. The cost is at most
// 4096·W padding elements per group. With W = 1 there is no padding: the shard is the group.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "../error.hpp"

namespace mpopt::zero {

inline constexpr std::size_t shard_alignment = 4096;

// [begin, end) element indices.
struct range {
  std::size_t begin = 0, end = 0;
  std::size_t size() const noexcept { return end - begin; }
  bool empty() const noexcept { return end == begin; }
  friend bool operator==(const range& a, const range& b) { return a.begin == b.begin && a.end == b.end; }
};

inline range intersect(range a, range b) {
  const std::size_t lo = std::max(a.begin, b.begin), hi = std::min(a.end, b.end);
  return lo < hi ? range{lo, hi} : range{lo, lo};
}

struct partition {
  std::size_t size = 0;   // real elements of the group
  int world = 1;          // ranks
  std::size_t shard = 0;  // elements per rank, padding included

  std::size_t padded_size() const noexcept { return shard * std::size_t(world); }
  // The real elements rank r owns (possibly empty).
  range owned(int r) const noexcept {
    const std::size_t lo = std::min(std::size_t(r) * shard, size), hi = std::min(lo + shard, size);
    return {lo, hi};
  }
  std::size_t padding(int r) const noexcept { return shard - owned(r).size(); }
  // The owner of element i < size.
  int owner(std::size_t i) const noexcept { return shard == 0 ? 0 : int(i / shard); }
  // How many elements of [r.begin, r.end) each rank owns, in rank order: the counts of a reduce-scatter or
  // all-gather over that range.
  std::vector<std::size_t> counts(range r) const {
    std::vector<std::size_t> c;
    counts(r, c);
    return c;
  }
  // The same into `out` (resized to world): no allocation once it has the capacity, for a step's hot path.
  void counts(range r, std::vector<std::size_t>& out) const {
    out.resize(static_cast<std::size_t>(world));
    for (int q = 0; q < world; ++q) out[std::size_t(q)] = intersect(r, owned(q)).size();
  }
  std::vector<std::size_t> counts() const { return counts({0, size}); }
};

// Throws mpopt::error naming the argument for world < 1 or an alignment of 0.
inline partition make_partition(std::size_t size, int world, std::size_t alignment = shard_alignment) {
  if (world < 1) throw error(status::invalid("make_partition: world size must be >= 1, got " + std::to_string(world)));
  if (alignment == 0) throw error(status::invalid("make_partition: alignment must be > 0, got 0"));
  partition p;
  p.size = size;
  p.world = world;
  if (world == 1) {
    p.shard = size;
  } else {
    const std::size_t per_rank = (size + std::size_t(world) - 1) / std::size_t(world);
    p.shard = (per_rank + alignment - 1) / alignment * alignment;
  }
  return p;
}

// The part of one tensor that one rank owns: tensor elements [tensor_offset, tensor_offset + count) are shard
// elements [shard_offset, shard_offset + count) of `rank`.
struct fragment {
  std::size_t tensor = 0;
  int rank = 0;
  std::size_t tensor_offset = 0;
  std::size_t shard_offset = 0;
  std::size_t count = 0;
};

// The tensor -> shard map: every non-empty fragment, by tensor then rank. `offsets` holds each tensor's start in the
// group and the group's end (tensors + 1 entries). A zero-sized tensor has no fragment.
inline std::vector<fragment> fragments(const partition& p, const std::vector<std::size_t>& offsets) {
  std::vector<fragment> out;
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    const range tr{offsets[t], offsets[t + 1]};
    for (int r = 0; r < p.world && !tr.empty(); ++r) {
      const range o = intersect(tr, p.owned(r));
      if (o.empty()) continue;
      out.push_back({t, r, o.begin - tr.begin, o.begin - std::size_t(r) * p.shard, o.size()});
    }
  }
  return out;
}

// A piece of [r.begin, r.end) that lies in one tensor and one block of the `block`-element grid (aligned to index
// 0 of the group). Partial sums are taken per segment and added in segment order, so a rank whose range starts on
// the grid produces exactly the single-rank segments of that range.
struct segment {
  std::size_t begin = 0, end = 0;  // group indices
  std::size_t tensor = 0;
};

inline std::vector<segment> grid_segments(range r, const std::vector<std::size_t>& offsets, std::size_t block) {
  std::vector<segment> out;
  // The first tensor that ends after r.begin (skipping zero-sized ones).
  std::size_t t = 0;
  while (t + 1 < offsets.size() && offsets[t + 1] <= r.begin) ++t;
  std::size_t i = r.begin;
  while (i < r.end && t + 1 < offsets.size()) {
    const std::size_t block_end = (i / block + 1) * block;
    const std::size_t e = std::min({r.end, offsets[t + 1], block_end});
    out.push_back({i, e, t});
    i = e;
    while (t + 1 < offsets.size() && offsets[t + 1] <= i) ++t;
  }
  return out;
}

}  // namespace mpopt::zero
