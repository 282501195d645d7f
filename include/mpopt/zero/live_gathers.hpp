// ZeRO stage 3's gathered param ranges, shared by the host and CUDA optimizers: each (group, first tensor, last
// tensor) range gathered once and counted per use, with the elements held bounded by
// zero_options::max_live_elements (DeepSpeed's stage3_max_live_parameters). A prefetched range is held with no use
// until its gather(); release() frees a range with its last use, or at once when it has none.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "../error.hpp"

namespace mpopt::zero {

// Buffer: an owning buffer with size() (host::aligned_buffer; cuda::optimizer's gathered_range).
template <class Buffer>
class live_gathers {
 public:
  // The buffer of range (g, first, last) with one more use: the one held, else the Buffer that gather() returns,
  // held with one use. Throws before calling gather() when its n elements do not fit under max_live beside those
  // held, so nothing is allocated or communicated then.
  template <class Gather>
  Buffer& acquire(std::size_t g, std::size_t first, std::size_t last, std::size_t n, std::size_t max_live,
                  Gather&& gather) {
    auto it = live_.find(std::make_tuple(g, first, last));
    if (it != live_.end()) {
      ++it->second.uses;
      return it->second.data;
    }
    if (!has_room(n, max_live))
      throw error(status::invalid(
          "gather: group " + std::to_string(g) + " tensors [" + std::to_string(first) + ", " + std::to_string(last) +
          ") need " + std::to_string(n) + " elements but " + std::to_string(elements_) +
          " of zero_options.max_live_elements = " + std::to_string(max_live) + " are gathered; release some first"));
    return add(g, first, last, gather(), 1);
  }

  // Holds the Buffer that gather() returns for range (g, first, last) with no use until its acquire(). False, with
  // gather() not called, when the range is held already or its n elements do not fit under max_live.
  template <class Gather>
  bool prefetch(std::size_t g, std::size_t first, std::size_t last, std::size_t n, std::size_t max_live,
                Gather&& gather) {
    if (find(g, first, last) != nullptr || !has_room(n, max_live)) return false;
    add(g, first, last, gather(), 0);
    return true;
  }

  // The buffer of a held range; null when it is not held.
  const Buffer* find(std::size_t g, std::size_t first, std::size_t last) const {
    auto it = live_.find(std::make_tuple(g, first, last));
    return it == live_.end() ? nullptr : &it->second.data;
  }

  // One use fewer; the buffer is freed with the last (a prefetched range without a use: at once).
  void release(std::size_t g, std::size_t first, std::size_t last) {
    auto it = live_.find(std::make_tuple(g, first, last));
    if (it == live_.end())
      throw error(status::invalid("release: group " + std::to_string(g) + " tensors [" + std::to_string(first) + ", " +
                                  std::to_string(last) + ") are not gathered"));
    if (it->second.uses > 1) {
      --it->second.uses;
      return;
    }
    elements_ -= it->second.data.size();
    live_.erase(it);
  }

  std::size_t elements() const noexcept { return elements_; }

 private:
  bool has_room(std::size_t n, std::size_t max_live) const { return elements_ + n <= max_live; }
  Buffer& add(std::size_t g, std::size_t first, std::size_t last, Buffer data, int uses) {
    elements_ += data.size();
    return live_.emplace(std::make_tuple(g, first, last), entry{std::move(data), uses}).first->second.data;
  }

  struct entry {
    Buffer data;
    int uses = 0;
  };
  std::map<std::tuple<std::size_t, std::size_t, std::size_t>, entry> live_;
  std::size_t elements_ = 0;
};

}  // namespace mpopt::zero
