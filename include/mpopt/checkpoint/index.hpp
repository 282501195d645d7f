// A checkpoint directory and its index: what load() and the consolidation tool read before any tensor.
//
//   <dir>/index.json                         written last, by rank 0; without it the checkpoint does not load
//   <dir>/rank-<r>-of-<W>.safetensors        one per saving rank: for each group g the rank's element range
//                                            [begin, end) of "group<g>.master", "group<g>.state.<name>" and,
//                                            with a kahan_summation master, "group<g>.master_compensation"
//
// index.json = {"metadata": {string: string}, "files": [{"rank", "file", "bytes", "crc32", "ranges": [[b, e], ..]}]}.
// The metadata (also in every rank file's __metadata__, with "rank" and "group.<g>.range" added) describes the
// optimizer that wrote it; keys are flat strings so new state adds keys without changing the schema:
//   format, format_version, save_id, rule, scaler, precision.{param,master,grad,state,compute,master_rounding}, step,
//   zero.{stage,world_size,shard_alignment}, groups, group.<g>.{size,tensor_sizes,num_states,states,shard},
//   group.<g>.hparams.<field>, scaler_args.<field>, scaler_state.<field>, step_options.<field>, user.<key>.
// Readers ignore keys they do not know; a change old readers must not ignore bumps format_version.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../numeric/convert.hpp"
#include "../numeric/traits.hpp"
#include "../policy/rounding.hpp"
#include "../zero/partition.hpp"
#include "json.hpp"
#include "safetensors.hpp"

namespace mpopt::checkpoint {

inline constexpr const char* format_name = "mpopt-checkpoint";
inline constexpr int format_version = 1;
inline constexpr const char* index_name = "index.json";

inline std::string rank_file_name(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "rank-%05d-of-%05d.safetensors", rank, world);
  return buf;
}
inline std::string master_tensor(std::size_t g) {
  return "group" + std::to_string(g) + ".master";
}
inline std::string state_tensor(std::size_t g, const std::string& name) {
  return "group" + std::to_string(g) + ".state." + name;
}
// kahan_summation: what rounding dropped from each master element, in the master's dtype, resharded like it.
inline std::string compensation_tensor(std::size_t g) {
  return "group" + std::to_string(g) + ".master_compensation";
}

// "precision.master_rounding": nearest, stochastic or kahan (policy/rounding.hpp).
template <class Rounding>
constexpr const char* master_rounding_name() {
  if constexpr (std::is_same_v<Rounding, kahan_summation>) {
    return "kahan";
  } else if constexpr (std::is_same_v<Rounding, stochastic_rounding>) {
    return "stochastic";
  } else {
    static_assert(std::is_same_v<Rounding, nearest_rounding>, "master_rounding_name: not a master rounding option");
    return "nearest";
  }
}

// The weight a Kahan master holds, its stored value plus its compensation, rounded once to T. The sum is taken in
// double, where two 16-bit values add exactly (or, for a compensation below 2^-45 of the weight, with an error far
// below any T's rounding).
template <class T>
T kahan_weight(double master, double compensation) {
  return convert<T>(master + compensation);
}

// ---------------------------------------------------------------------------------------------------------------
// Exact text forms of numbers (shortest round-trip is not needed: %.17g / %.9g read back exactly).

inline std::string format_double(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
inline std::string format_float32(float v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", double(v));
  return buf;
}
inline bool parse_double(const std::string& s, double& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  out = std::strtod(s.c_str(), &end);
  return *end == '\0';
}
inline bool parse_float32(const std::string& s, float& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  out = std::strtof(s.c_str(), &end);
  return *end == '\0';
}
inline bool parse_i64(const std::string& s, std::int64_t& out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || *end != '\0') return false;
  out = std::int64_t(v);
  return true;
}
inline bool parse_size(const std::string& s, std::size_t& out) {
  std::int64_t v = 0;
  if (!parse_i64(s, v) || v < 0) return false;
  out = std::size_t(v);
  return true;
}
inline std::string join_sizes(const std::vector<std::size_t>& v) {
  std::string s;
  for (std::size_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}
// The first n names, comma-separated (a group's "states"; split_names() reads it back).
inline std::string join_names(const char* const* names, int n) {
  std::string s;
  for (int j = 0; j < n; ++j) s += (j ? "," : "") + std::string(names[j]);
  return s;
}
inline bool split_sizes(const std::string& s, std::vector<std::size_t>& out) {
  out.clear();
  if (s.empty()) return true;
  std::size_t at = 0;
  for (;;) {
    const std::size_t comma = s.find(',', at);
    std::size_t v = 0;
    if (!parse_size(s.substr(at, comma == std::string::npos ? std::string::npos : comma - at), v)) return false;
    out.push_back(v);
    if (comma == std::string::npos) return true;
    at = comma + 1;
  }
}
inline std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (!s.empty()) {
    const std::size_t comma = s.find(',', at);
    out.push_back(s.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The index.

// Metadata: flat string keys and values (the index's and every file's __metadata__).
using meta_map = std::map<std::string, std::string>;

namespace detail {

inline status meta_get(const meta_map& m, const std::string& dir, const std::string& key, std::string& out) {
  auto it = m.find(key);
  if (it == m.end()) return status::invalid("checkpoint " + dir + ": metadata key \"" + key + "\" is missing");
  out = it->second;
  return status::success();
}

}  // namespace detail

struct file_entry {
  int rank = 0;
  std::string file;  // a name inside the checkpoint directory
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
  std::vector<zero::range> ranges;  // per group: the elements this file holds
};

struct group_entry {
  std::size_t size = 0;
  std::vector<std::size_t> tensor_sizes;  // never empty: one tensor of `size` when the optimizer had none
  std::vector<std::string> states;        // state names, in state-index order
};

struct index {
  std::string dir;
  meta_map metadata;
  std::vector<file_entry> files;  // by rank
  std::vector<group_entry> groups;
  int stage = 0, world = 1;
  std::int64_t step = 0;
  dtype master = dtype::fp32, state = dtype::fp32;
  std::string master_rounding;  // "precision.master_rounding"; empty when the key is absent

  // The rank files also hold each group's compensation_tensor().
  bool kahan() const { return master_rounding == master_rounding_name<kahan_summation>(); }

  // The value of `key`, or an error naming it.
  status get(const std::string& key, std::string& out) const { return detail::meta_get(metadata, dir, key, out); }
  std::string path(const file_entry& f) const { return dir + "/" + f.file; }
};

namespace detail {

inline status bad_key(const index& ix, const std::string& key, const std::string& want, const std::string& got) {
  return status::invalid("checkpoint " + ix.dir + ": metadata \"" + key + "\" must be " + want + ", got \"" + got +
                         "\"");
}

// Entry q of an index.json array of files ("files"; a 1-bit checkpoint's "local_files"), all but its ranges: rank q,
// a file name inside the checkpoint directory, its size and CRC-32. `where` starts each message.
inline status read_file_entry(const json::value& f, std::size_t q, const std::string& where, file_entry& e) {
  const json::value* rank = f.is_object() ? f.find("rank") : nullptr;
  const json::value* name = f.is_object() ? f.find("file") : nullptr;
  const json::value* bytes = f.is_object() ? f.find("bytes") : nullptr;
  const json::value* crc = f.is_object() ? f.find("crc32") : nullptr;
  std::uint64_t u = 0;
  if (rank == nullptr || !to_u64(*rank, u) || u != q)
    return status::invalid(where + "\"rank\" must be " + std::to_string(q));
  e.rank = int(q);
  if (name == nullptr || !name->is_string() || name->text.empty() || name->text.find('/') != std::string::npos ||
      name->text[0] == '.')
    return status::invalid(where + "\"file\" must be a file name inside the checkpoint directory");
  e.file = name->text;
  if (bytes == nullptr || !to_u64(*bytes, e.bytes)) return status::invalid(where + "\"bytes\" is missing");
  if (crc == nullptr || !crc->is_string() || crc->text.size() != 8)
    return status::invalid(where + "\"crc32\" must be 8 hex digits");
  char* end = nullptr;
  e.crc = std::uint32_t(std::strtoul(crc->text.c_str(), &end, 16));
  if (*end != '\0') return status::invalid(where + "\"crc32\" must be 8 hex digits, got \"" + crc->text + "\"");
  return status::success();
}

}  // namespace detail

// Reads <dir>/index.json and checks that it is complete and consistent: the format and version, every group's
// layout, one file per saving rank whose ranges tile each group in rank order.
inline status read_index(const std::string& dir, index& ix) {
  ix = index{};
  ix.dir = dir;
  const std::string path = dir + "/" + index_name;
  std::string text;
  status st = read_text_file(path, text);
  if (!st.ok())
    return status::invalid("checkpoint " + dir + ": no readable " + index_name +
                           " (an incomplete or interrupted save has none): " + st.message);
  json::value root;
  st = json::parse(text, root);
  if (!st.ok()) return status::invalid(path + ": " + st.message);
  const json::value* meta = root.is_object() ? root.find("metadata") : nullptr;
  const json::value* files = root.is_object() ? root.find("files") : nullptr;
  if (meta == nullptr || !meta->is_object() || files == nullptr || !files->is_array())
    return status::invalid(path + ": expected an object with a \"metadata\" object and a \"files\" array");
  for (const auto& kv : meta->members) {
    if (!kv.second.is_string())
      return status::invalid(path + ": metadata value of \"" + kv.first + "\" is not a string");
    ix.metadata[kv.first] = kv.second.text;
  }

  std::string v;
  if (!(st = ix.get("format", v)).ok()) return st;
  if (v != format_name) return detail::bad_key(ix, "format", std::string("\"") + format_name + "\"", v);
  if (!(st = ix.get("format_version", v)).ok()) return st;
  if (v != std::to_string(format_version))
    return status::invalid("checkpoint " + dir + ": format_version is \"" + v + "\", this build reads " +
                           std::to_string(format_version));
  if (!(st = ix.get("save_id", v)).ok()) return st;
  std::int64_t n = 0;
  if (!(st = ix.get("zero.stage", v)).ok()) return st;
  if (!parse_i64(v, n) || n < 0 || n > 3) return detail::bad_key(ix, "zero.stage", "0, 1, 2 or 3", v);
  ix.stage = int(n);
  if (!(st = ix.get("zero.world_size", v)).ok()) return st;
  if (!parse_i64(v, n) || n < 1 || n > (1 << 24)) return detail::bad_key(ix, "zero.world_size", "an integer >= 1", v);
  ix.world = int(n);
  if (!(st = ix.get("step", v)).ok()) return st;
  if (!parse_i64(v, ix.step) || ix.step < 0) return detail::bad_key(ix, "step", "an integer >= 0", v);
  if (!(st = ix.get("precision.master", v)).ok()) return st;
  if (!parse_dtype(v, ix.master)) return detail::bad_key(ix, "precision.master", "fp32, fp16, bf16 or fp64", v);
  if (!(st = ix.get("precision.state", v)).ok()) return st;
  if (!parse_dtype(v, ix.state)) return detail::bad_key(ix, "precision.state", "fp32, fp16, bf16 or fp64", v);
  if (ix.get("precision.master_rounding", v).ok()) {
    if (v != master_rounding_name<nearest_rounding>() && v != master_rounding_name<stochastic_rounding>() &&
        v != master_rounding_name<kahan_summation>())
      return detail::bad_key(ix, "precision.master_rounding", "nearest, stochastic or kahan", v);
    ix.master_rounding = v;
  }
  std::size_t groups = 0;
  if (!(st = ix.get("groups", v)).ok()) return st;
  if (!parse_size(v, groups)) return detail::bad_key(ix, "groups", "an integer >= 0", v);
  for (std::size_t g = 0; g < groups; ++g) {
    const std::string k = "group." + std::to_string(g) + ".";
    group_entry e;
    if (!(st = ix.get(k + "size", v)).ok()) return st;
    if (!parse_size(v, e.size)) return detail::bad_key(ix, k + "size", "an integer >= 0", v);
    if (!(st = ix.get(k + "tensor_sizes", v)).ok()) return st;
    std::size_t total = 0;
    if (!split_sizes(v, e.tensor_sizes)) return detail::bad_key(ix, k + "tensor_sizes", "comma-separated sizes", v);
    for (std::size_t s : e.tensor_sizes) total += s;
    if (total != e.size || e.tensor_sizes.empty())
      return detail::bad_key(ix, k + "tensor_sizes", "sizes adding up to group size " + std::to_string(e.size), v);
    if (!(st = ix.get(k + "states", v)).ok()) return st;
    e.states = split_names(v);
    if (!(st = ix.get(k + "num_states", v)).ok()) return st;
    if (!parse_i64(v, n) || n != std::int64_t(e.states.size()))
      return detail::bad_key(ix, k + "num_states", "the number of names in " + k + "states", v);
    ix.groups.push_back(std::move(e));
  }

  if (files->items.size() != std::size_t(ix.world))
    return status::invalid(path + ": " + std::to_string(files->items.size()) + " files listed but zero.world_size is " +
                           std::to_string(ix.world));
  for (std::size_t q = 0; q < files->items.size(); ++q) {
    const json::value& f = files->items[q];
    const std::string where = path + ": files[" + std::to_string(q) + "]: ";
    file_entry e;
    if (!(st = detail::read_file_entry(f, q, where, e)).ok()) return st;
    const json::value* ranges = f.is_object() ? f.find("ranges") : nullptr;
    if (ranges == nullptr || !ranges->is_array() || ranges->items.size() != groups)
      return status::invalid(where + "\"ranges\" must list [begin, end] for each of the " + std::to_string(groups) +
                             " groups");
    for (std::size_t g = 0; g < groups; ++g) {
      const json::value& r = ranges->items[g];
      zero::range rg;
      std::uint64_t b = 0, x = 0;
      if (!r.is_array() || r.items.size() != 2 || !detail::to_u64(r.items[0], b) || !detail::to_u64(r.items[1], x) ||
          b > x)
        return status::invalid(where + "ranges[" + std::to_string(g) + "] must be [begin, end]");
      rg.begin = std::size_t(b);
      rg.end = std::size_t(x);
      // Rank order tiles the group: this range starts where the previous rank's ended.
      const std::size_t expect = q == 0 ? 0 : ix.files[q - 1].ranges[g].end;
      if (rg.begin != expect || rg.end > ix.groups[g].size ||
          (q + 1 == files->items.size() && rg.end != ix.groups[g].size))
        return status::invalid(where + "ranges[" + std::to_string(g) + "] = [" + std::to_string(rg.begin) + ", " +
                               std::to_string(rg.end) + ") does not continue the ranks before it to cover group " +
                               std::to_string(g) + "'s " + std::to_string(ix.groups[g].size) + " elements");
      e.ranges.push_back(rg);
    }
    ix.files.push_back(std::move(e));
  }
  return status::success();
}

// One saved rank's file, opened and checked against the index: its size, its CRC-32 (when asked; this reads the
// whole file), its header and that it belongs to this save (save_id, rank).
struct shard_reader {
  input_file file;
  safetensors_header header;

  status open(const index& ix, const file_entry& e, bool verify_checksum) {
    const std::string p = ix.path(e);
    status st = file.open(p);
    if (!st.ok()) return st;
    if (file.size() != e.bytes)
      return status::invalid(p + ": " + std::to_string(file.size()) + " bytes, the index says " +
                             std::to_string(e.bytes) + (file.size() < e.bytes ? " (truncated)" : ""));
    if (!(st = read_header(file, header)).ok()) return st;
    if (verify_checksum) {
      std::uint32_t c = 0;
      if (!(st = file.checksum(c)).ok()) return st;
      if (c != e.crc)
        return status::invalid(p + ": crc32 is " + hex32(c) + ", the index says " + hex32(e.crc) +
                               " (the file is corrupt or from another save)");
    }
    for (const char* key : {"save_id", "rank"}) {
      auto it = header.metadata.find(key);
      const std::string want = std::string(key) == "rank" ? std::to_string(e.rank) : ix.metadata.at("save_id");
      if (it == header.metadata.end() || it->second != want)
        return status::invalid(p + ": metadata \"" + key + "\" is \"" +
                               (it == header.metadata.end() ? std::string("(missing)") : it->second) +
                               "\", the index says \"" + want + "\" (a file from another save)");
    }
    return status::success();
  }

  // Elements [piece.begin, piece.end) (group indices) of tensor `name`, which holds group elements `saved`, into
  // out[0, piece.size()), converted to T when the file's dtype differs and `allow_convert` (else an error).
  template <class T>
  status read(const std::string& name, zero::range saved, zero::range piece, T* out, bool allow_convert) const {
    const tensor_info* t = header.find(name);
    const std::string p = file.path();
    if (t == nullptr) return status::invalid(p + ": tensor \"" + name + "\" is missing");
    if (t->shape.size() != 1 || t->shape[0] != saved.size())
      return status::invalid(p + ": tensor \"" + name + "\" must have shape [" + std::to_string(saved.size()) +
                             "] (its range in the index)");
    dtype d{};
    if (!parse_dtype(t->dtype, d))
      return status::invalid(p + ": tensor \"" + name + "\" has dtype " + t->dtype + ", not a float type");
    const std::uint64_t esize = safetensors_dtype_size(t->dtype);
    const std::uint64_t at = header.data_start + t->begin + (piece.begin - saved.begin) * esize;
    if (d == dtype_of<T>::value) return file.read(at, out, piece.size() * sizeof(T));
    if (!allow_convert)
      return status::invalid(p + ": tensor \"" + name + "\" has dtype " + t->dtype + ", this optimizer's is " +
                             safetensors_dtype(dtype_of<T>::value) + " (set load_options::convert_dtypes to round)");
    switch (d) {
      case dtype::fp32: return read_as<float>(at, piece.size(), out);
      case dtype::fp16: return read_as<half_t>(at, piece.size(), out);
      case dtype::bf16: return read_as<bf16_t>(at, piece.size(), out);
      case dtype::fp64: return read_as<double>(at, piece.size(), out);
    }
    return status::invalid(p + ": unreachable dtype");
  }

 private:
  template <class S, class T>
  status read_as(std::uint64_t at, std::size_t n, T* out) const {
    std::vector<S> tmp(n);
    const status st = file.read(at, tmp.data(), n * sizeof(S));
    if (!st.ok()) return st;
    for (std::size_t i = 0; i < n; ++i) out[i] = convert<T>(tmp[i]);
    return status::success();
  }
};

}  // namespace mpopt::checkpoint
