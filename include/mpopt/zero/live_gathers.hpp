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
  // The buffer of a range already gathered, with one more use counted; null when it is not gathered.
  Buffer* reuse(std::size_t g, std::size_t first, std::size_t last) {
    auto it = live_.find(std::make_tuple(g, first, last));
    if (it == live_.end()) return nullptr;
    ++it->second.uses;
    return &it->second.data;
  }

  bool holds(std::size_t g, std::size_t first, std::size_t last) const {
    return live_.count(std::make_tuple(g, first, last)) > 0;
  }
  bool has_room(std::size_t n, std::size_t max_live) const { return elements_ + n <= max_live; }

  // Throws unless n more elements fit under max_live, before anything is allocated or communicated.
  void check_room(std::size_t g, std::size_t first, std::size_t last, std::size_t n, std::size_t max_live) const {
    if (has_room(n, max_live)) return;
    throw error(status::invalid(
        "gather: group " + std::to_string(g) + " tensors [" + std::to_string(first) + ", " + std::to_string(last) +
        ") need " + std::to_string(n) + " elements but " + std::to_string(elements_) +
        " of zero_options.max_live_elements = " + std::to_string(max_live) + " are gathered; release some first"));
  }

  // Registers a newly gathered range with `uses` uses (0: prefetched).
  Buffer& add(std::size_t g, std::size_t first, std::size_t last, Buffer data, int uses = 1) {
    elements_ += data.size();
    return live_.emplace(std::make_tuple(g, first, last), entry{std::move(data), uses}).first->second.data;
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
  struct entry {
    Buffer data;
    int uses = 0;
  };
  std::map<std::tuple<std::size_t, std::size_t, std::size_t>, entry> live_;
  std::size_t elements_ = 0;
};

}  // namespace mpopt::zero
