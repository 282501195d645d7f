// Offline consolidation (DeepSpeed's zero_to_fp32): a checkpoint written at any world size and ZeRO stage into one
// safetensors file of full tensors, with no communicator. Tensor t of group g is "group<g>.tensor<t>" (1-D, its
// element count; a group built without tensor_sizes is one tensor, "group<g>.tensor0"); with `states`, also
// "group<g>.tensor<t>.<state name>". The file's __metadata__ is the checkpoint's (plus "consolidated_dtype").
// One group is in memory at a time.
//
// A Kahan checkpoint (kahan_summation master) holds each weight as master + compensation: the tool writes that sum,
// rounded once to the output dtype, which defaults to fp32 there (a 16-bit output would round most of the
// compensation away again). The compensation itself is not written. A Muon checkpoint (muon.hpp: one group per
// tensor, each in its owner's file) consolidates the same way, a Kahan one included.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "../error.hpp"
#include "../numeric/convert.hpp"
#include "../numeric/traits.hpp"
#include "index.hpp"
#include "safetensors.hpp"

namespace mpopt::checkpoint {

struct consolidate_options {
  std::string dtype;  // output dtype: "fp32", "bf16", "fp16" or "fp64"; empty: the master's (fp32 for a Kahan one)
  bool states = false;
  bool verify_checksums = true;
};

namespace detail {

// A whole group tensor (`name` in every file) as T.
template <class T>
status read_full(const index& ix, std::vector<shard_reader>& files, std::size_t g, const std::string& name,
                 std::vector<T>& out) {
  out.assign(ix.groups[g].size, T{});
  for (std::size_t q = 0; q < files.size(); ++q) {
    const zero::range r = ix.files[q].ranges[g];
    if (r.empty()) continue;
    const status st = files[q].read(name, r, r, out.data() + r.begin, /*allow_convert=*/true);
    if (!st.ok()) return st;
  }
  return status::success();
}

// Group g's weights as T: the master, plus its compensation in a Kahan checkpoint.
template <class T>
status read_weights(const index& ix, std::vector<shard_reader>& files, std::size_t g, std::vector<T>& out) {
  if (!ix.kahan()) return read_full(ix, files, g, master_tensor(g), out);
  std::vector<double> m, c;
  status st = read_full(ix, files, g, master_tensor(g), m);
  if (st.ok()) st = read_full(ix, files, g, compensation_tensor(g), c);
  if (!st.ok()) return st;
  out.resize(m.size());
  for (std::size_t i = 0; i < m.size(); ++i) out[i] = kahan_weight<T>(m[i], c[i]);
  return st;
}

template <class T>
status consolidate_as(const index& ix, std::vector<shard_reader>& files, const std::string& out,
                      const consolidate_options& o) {
  const char* dt = safetensors_dtype(dtype_of<T>::value);
  std::vector<tensor_entry> entries;
  for (std::size_t g = 0; g < ix.groups.size(); ++g) {
    const group_entry& ge = ix.groups[g];
    for (std::size_t t = 0; t < ge.tensor_sizes.size(); ++t) {
      const std::string base = "group" + std::to_string(g) + ".tensor" + std::to_string(t);
      entries.push_back({base, dt, {ge.tensor_sizes[t]}, nullptr});
      if (o.states)
        for (const auto& s : ge.states) entries.push_back({base + "." + s, dt, {ge.tensor_sizes[t]}, nullptr});
    }
  }
  std::map<std::string, std::string> meta = ix.metadata;
  meta["consolidated_dtype"] = dtype_name(dtype_of<T>::value);
  safetensors_writer w;
  status st = w.begin(out, entries, meta);
  // Streamed in the header's order: per group, per tensor, the master and then its states.
  for (std::size_t g = 0; st.ok() && g < ix.groups.size(); ++g) {
    const group_entry& ge = ix.groups[g];
    std::vector<std::vector<T>> full(1 + (o.states ? ge.states.size() : 0));
    st = read_weights(ix, files, g, full[0]);
    for (std::size_t j = 0; st.ok() && j + 1 < full.size(); ++j)
      st = read_full(ix, files, g, state_tensor(g, ge.states[j]), full[j + 1]);
    std::size_t at = 0;
    for (std::size_t t = 0; st.ok() && t < ge.tensor_sizes.size(); ++t) {
      for (std::size_t k = 0; st.ok() && k < full.size(); ++k)
        st = w.write(full[k].data() + at, ge.tensor_sizes[t] * sizeof(T));
      at += ge.tensor_sizes[t];
    }
  }
  if (st.ok()) st = w.finish();
  return st;
}

}  // namespace detail

// Reads checkpoint `dir` (checking every file against the index) and writes `out` crash-safely.
inline status consolidate(const std::string& dir, const std::string& out, const consolidate_options& o = {}) {
  index ix;
  status st = read_index(dir, ix);
  if (!st.ok()) return st;
  dtype d = ix.kahan() ? dtype::fp32 : ix.master;
  if (!o.dtype.empty() && !parse_dtype(o.dtype, d))
    return status::invalid("consolidate: dtype must be fp32, bf16, fp16 or fp64, got \"" + o.dtype + "\"");
  std::vector<shard_reader> files(ix.files.size());
  for (std::size_t q = 0; q < files.size(); ++q)
    if (!(st = files[q].open(ix, ix.files[q], o.verify_checksums)).ok()) return st;
  switch (d) {
    case dtype::fp32: return detail::consolidate_as<float>(ix, files, out, o);
    case dtype::fp16: return detail::consolidate_as<half_t>(ix, files, out, o);
    case dtype::bf16: return detail::consolidate_as<bf16_t>(ix, files, out, o);
    case dtype::fp64: return detail::consolidate_as<double>(ix, files, out, o);
  }
  return status::invalid("consolidate: unreachable dtype");
}

}  // namespace mpopt::checkpoint
