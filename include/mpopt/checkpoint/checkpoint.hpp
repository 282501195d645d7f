// Checkpoints of mpopt::optimizer (host): save() and load(), both collective over the optimizer's communicator.
//
// What is saved: master weights, a kahan_summation master's compensation and every optimizer state (each rank its
// partition range, padding-free), the step counter, the loss-scaler state and arguments, the hyper-parameters of every
// group, the precision policy and the ZeRO layout (index.hpp lists the files and keys). The param copy is not saved: it
// is the master rounded to the param type, and load() rewrites it from the master on every rank.
//
// Crash safety: rank 0 first removes any old index.json; each rank writes its file under a temporary name, fsyncs
// and renames it; rank 0 writes index.json (file sizes and CRC-32s) last, the same way. A checkpoint without its
// index, or whose files do not match it, does not load.
//
// Resharding: load() works at any world size and ZeRO stage. Each rank reads, from each saved file whose range
// intersects its own local range, only the intersecting elements (so a rank holds O(its shard), not the model).
// All ranks validate everything and read into temporaries first, agree (one all-reduce) that every rank succeeded,
// and only then change the optimizer: a bad checkpoint throws mpopt::error on every rank and changes nothing.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../optimizer.hpp"
#include "../rules.hpp"
#include "../scaler/scalers.hpp"
#include "index.hpp"
#include "safetensors.hpp"

namespace mpopt::checkpoint {

// ---------------------------------------------------------------------------------------------------------------
// Hyper-parameters by name. A rule gets checkpoint support by specialising hparam_fields: visit(args, f) calls
// f("field", member) for every field (double or bool).
template <class Rule>
struct hparam_fields {
  static_assert(sizeof(Rule) == 0,
                "mpopt::checkpoint: this rule has no hparam_fields<Rule> specialisation listing its args fields");
};
template <>
struct hparam_fields<adam> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("eps", a.eps), f("weight_decay", a.weight_decay);
    f("adam_w_mode", a.adam_w_mode), f("amsgrad", a.amsgrad), f("bias_correction", a.bias_correction);
  }
};
template <>
struct hparam_fields<adamw> : hparam_fields<adam> {};
template <>
struct hparam_fields<lamb> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("eps", a.eps), f("weight_decay", a.weight_decay);
    f("max_coeff", a.max_coeff), f("min_coeff", a.min_coeff), f("bias_correction", a.bias_correction);
  }
};
template <>
struct hparam_fields<sgd> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("momentum", a.momentum), f("dampening", a.dampening), f("weight_decay", a.weight_decay);
    f("nesterov", a.nesterov);
  }
};
template <>
struct hparam_fields<adagrad> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("lr_decay", a.lr_decay), f("weight_decay", a.weight_decay);
    f("initial_accumulator_value", a.initial_accumulator_value), f("eps", a.eps);
  }
};
template <>
struct hparam_fields<lion> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("weight_decay", a.weight_decay);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Metadata values: written, read back and compared; shared by every checkpoint format (onebit.hpp, muon.hpp too).
namespace detail {

inline status meta_error(const std::string& dir, const std::string& key, const std::string& want,
                         const std::string& got) {
  return status::invalid("checkpoint " + dir + ": \"" + key + "\": checkpoint has \"" + got + "\", " + want);
}

// The saved value of `key` must be this optimizer's (`mine`, its describe()); else an error naming both.
inline status meta_same(const meta_map& saved, const meta_map& mine, const std::string& dir, const std::string& key) {
  std::string v;
  status st = meta_get(saved, dir, key, v);
  if (!st.ok()) return st;
  const std::string& want = mine.at(key);
  if (v != want) return meta_error(dir, key, "this optimizer has \"" + want + "\"", v);
  return status::success();
}
// The same for each of `keys`, in order: the first that differs fails.
inline status meta_all_same(const meta_map& saved, const meta_map& mine, const std::string& dir,
                            const std::vector<std::string>& keys) {
  for (const std::string& k : keys) {
    const status st = meta_same(saved, mine, dir, k);
    if (!st.ok()) return st;
  }
  return status::success();
}

template <class T>
status meta_read(const meta_map& m, const std::string& dir, const std::string& key, T& out) {
  std::string v;
  status st = meta_get(m, dir, key, v);
  if (!st.ok()) return st;
  bool ok = false;
  if constexpr (std::is_same_v<T, bool>) {
    ok = v == "true" || v == "false";
    out = v == "true";
  } else if constexpr (std::is_same_v<T, double>) {
    ok = parse_double(v, out);
  } else if constexpr (std::is_same_v<T, float>) {
    ok = parse_float32(v, out);
  } else {
    std::int64_t x = 0;
    ok = parse_i64(v, x) && x >= std::int64_t(std::numeric_limits<T>::min()) &&
         x <= std::int64_t(std::numeric_limits<T>::max());
    out = T(x);
  }
  if (!ok) return meta_error(dir, key, "which is not a valid value of its type", v);
  return status::success();
}

inline std::string to_text(bool v) {
  return v ? "true" : "false";
}
inline std::string to_text(double v) {
  return format_double(v);
}
inline std::string to_text(float v) {
  return format_float32(v);
}
inline std::string to_text(std::int64_t v) {
  return std::to_string(v);
}
inline std::string to_text(std::int32_t v) {
  return std::to_string(v);
}

// Rule's hyper-parameters as keys <prefix><field> (hparam_fields), and back.
template <class Rule>
void write_hparams(meta_map& m, const std::string& prefix, const typename Rule::args& a) {
  hparam_fields<Rule>::visit(a, [&](const char* field, const auto& v) { m[prefix + field] = to_text(v); });
}
template <class Rule>
status read_hparams(const meta_map& m, const std::string& dir, const std::string& prefix, typename Rule::args& a) {
  status st;
  hparam_fields<Rule>::visit(a, [&](const char* field, auto& v) {
    if (st.ok()) st = meta_read(m, dir, prefix + field, v);
  });
  return st;
}

// Hyper-parameters read from a checkpoint, before they replace the optimizer's: valid for Rule and, where
// num_states >= 0, needing that many states. `what` names their group in the message ("group 0", "aux group 1").
template <class Rule>
status check_hparams(const typename Rule::args& a, const std::string& dir, const std::string& what,
                     int num_states = -1) {
  const status st = Rule::validate(a);
  if (!st.ok()) return status::invalid("checkpoint " + dir + ": " + what + ": " + st.message);
  if (num_states >= 0 && Rule::num_states(a) != num_states)
    return status::invalid("checkpoint " + dir + ": " + what + ": its hyper-parameters need " +
                           std::to_string(Rule::num_states(a)) + " states, this optimizer has " +
                           std::to_string(num_states));
  return status::success();
}

// Scalers: name, arguments (informational: they are constructor arguments) and state (restored).
template <class Scaler>
struct scaler_io;
template <>
struct scaler_io<no_scaler> {
  static constexpr const char* name = "none";
  static void write_args(const no_scaler::args& a, meta_map& m) {
    m["scaler_args.check_overflow"] = to_text(a.check_overflow);
  }
  static void write_state(const no_scaler::state_type&, meta_map&) {}
  static status read(const meta_map&, const std::string&, no_scaler::state_type&) { return status::success(); }
};
template <>
struct scaler_io<static_scaler> {
  static constexpr const char* name = "static";
  static void write_args(const static_scaler::args& a, meta_map& m) { m["scaler_args.scale"] = to_text(a.scale); }
  static void write_state(const static_scaler::state_type&, meta_map&) {}
  static status read(const meta_map&, const std::string&, static_scaler::state_type&) { return status::success(); }
};
template <>
struct scaler_io<dynamic_scaler> {
  static constexpr const char* name = "dynamic";
  static void write_args(const dynamic_scale_args& a, meta_map& m) {
    m["scaler_args.init_scale"] = to_text(a.init_scale);
    m["scaler_args.scale_window"] = to_text(a.scale_window);
    m["scaler_args.hysteresis"] = to_text(a.hysteresis);
    m["scaler_args.consecutive_hysteresis"] = to_text(a.consecutive_hysteresis);
    m["scaler_args.min_scale"] = to_text(a.min_scale);
    m["scaler_args.max_scale"] = to_text(a.max_scale);
    m["scaler_args.growth_factor"] = to_text(a.growth_factor);
    m["scaler_args.backoff_factor"] = to_text(a.backoff_factor);
    m["scaler_args.error_at_min"] = to_text(a.error_at_min);
    m["scaler_args.deepspeed_window"] = to_text(a.deepspeed_window);
  }
  static void write_state(const scaler_state& s, meta_map& m) {
    m["scaler_state.iter"] = to_text(s.iter);
    m["scaler_state.last_overflow_iter"] = to_text(s.last_overflow_iter);
    m["scaler_state.growth_tracker"] = to_text(s.growth_tracker);
    m["scaler_state.scale"] = to_text(s.scale);
    m["scaler_state.hysteresis_left"] = to_text(s.hysteresis_left);
  }
  static status read(const meta_map& m, const std::string& dir, scaler_state& s) {
    scaler_state t{};
    status st = meta_read(m, dir, "scaler_state.iter", t.iter);
    if (st.ok()) st = meta_read(m, dir, "scaler_state.last_overflow_iter", t.last_overflow_iter);
    if (st.ok()) st = meta_read(m, dir, "scaler_state.growth_tracker", t.growth_tracker);
    if (st.ok()) st = meta_read(m, dir, "scaler_state.scale", t.scale);
    if (st.ok()) st = meta_read(m, dir, "scaler_state.hysteresis_left", t.hysteresis_left);
    if (st.ok() && !(std::isfinite(t.scale) && t.scale > 0))
      st = meta_error(dir, "scaler_state.scale", "a loss scale must be finite and > 0", format_float32(t.scale));
    if (st.ok()) s = t;
    return st;
  }
};

// The keys every format writes (index.hpp): format, format_version, rule, scaler, precision.*, step,
// zero.{stage,world_size}, step_options.{max_grad_norm,deepspeed_scale_order} and scaler_state.*. Each format's
// describe() adds its own; the scaler's arguments too, where the optimizer exposes them (scaler_io::write_args).
template <class Opt>
meta_map describe_common(const Opt& opt, const char* rule, int zero_stage, int zero_world_size) {
  using Prec = typename Opt::precision_type;
  using Scaler = typename Opt::scaler_type;
  meta_map m;
  m["format"] = format_name;
  m["format_version"] = std::to_string(format_version);
  m["rule"] = rule;
  m["scaler"] = scaler_io<Scaler>::name;
  m["precision.param"] = dtype_name<typename Prec::param_t>();
  m["precision.master"] = dtype_name<typename Prec::master_t>();
  m["precision.grad"] = dtype_name<typename Prec::grad_t>();
  m["precision.state"] = dtype_name<typename Prec::state_t>();
  m["precision.compute"] = dtype_name<typename Prec::compute_t>();
  // Stochastic rounding's random state is the seed (step_options.rounding_seed, where the format has that rounding)
  // and the step count; resuming bitwise needs the same seed. Kahan's is the compensation tensor of every group.
  m["precision.master_rounding"] = master_rounding_name<typename Prec::master_rounding>();
  m["step"] = std::to_string(opt.step_count());
  m["zero.stage"] = std::to_string(zero_stage);
  m["zero.world_size"] = std::to_string(zero_world_size);
  m["step_options.max_grad_norm"] = format_double(opt.options().max_grad_norm);
  m["step_options.deepspeed_scale_order"] = to_text(opt.options().deepspeed_scale_order);
  scaler_io<Scaler>::write_state(opt.scaler_state(), m);
  return m;
}

// A group's layout keys group.<g>.{size,tensor_sizes,num_states,states} (no tensor sizes: one tensor of `size`).
// Returns the prefix "group.<g>." for the format's own keys.
inline std::string describe_group(meta_map& m, std::size_t g, std::size_t size, std::vector<std::size_t> tensor_sizes,
                                  const char* const* state_names, int num_states) {
  const std::string k = "group." + std::to_string(g) + ".";
  if (tensor_sizes.empty()) tensor_sizes.push_back(size);
  m[k + "size"] = std::to_string(size);
  m[k + "tensor_sizes"] = join_sizes(tensor_sizes);
  m[k + "num_states"] = std::to_string(num_states);
  m[k + "states"] = join_names(state_names, num_states);
  return k;
}

// f()'s status, a throw (bad_alloc) turned into a failure: every rank must still reach agree(), or the others would
// wait there forever.
template <class F>
status status_of(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return status::invalid(e.what());
  }
}

// Every rank calls this with its own outcome; if any failed, every rank throws (the failing rank its own message,
// the others one naming it), so no rank goes on alone into a collective or a partial state.
inline void agree(comm::communicator& c, const status& st, const char* what) {
  double failed = st.ok() ? 0.0 : double(c.rank() + 1);
  c.all_reduce(&failed, 1, comm::reduce_op::max);
  if (failed == 0.0) return;
  if (!st.ok()) throw error(status{st.code, std::string(what) + ": " + st.message});
  throw error(status::invalid(std::string(what) + ": failed on rank " + std::to_string(int(failed) - 1) +
                              " (its error says why); nothing was changed"));
}

// Element range each saving rank writes: the ZeRO partition at the saving world size, at stage 0 too (replicas
// split the writing instead of each writing everything).
inline zero::range saved_range(std::size_t size, int world, int rank) {
  return zero::make_partition(size, world).owned(rank);
}

// The start of every save (collective): rank 0 creates `dir` and removes its old index, so the directory does not
// load until the new index is complete; then a fresh id, the same on every rank, ties the files to that index.
inline std::string begin_save(comm::communicator& c, const std::string& dir, const char* what) {
  status st;
  if (c.rank() == 0) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) st = status::invalid("cannot create directory " + dir + ": " + ec.message());
    const std::string idx = dir + "/" + index_name;
    if (st.ok() && std::filesystem::exists(idx, ec)) {
      std::filesystem::remove(idx, ec);
      if (ec) st = status::invalid("cannot remove the old " + idx + ": " + ec.message());
      if (st.ok()) st = fsync_dir(dir);
    }
  }
  agree(c, st, what);
  double id[2] = {0, 0};  // 32-bit halves travel exactly as doubles
  if (c.rank() == 0) {
    std::random_device rd;
    const auto t = std::uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    id[0] = double(std::uint32_t(rd()) ^ std::uint32_t(t));
    id[1] = double(std::uint32_t(rd()) ^ std::uint32_t(t >> 32));
  }
  c.broadcast(id, 2, 0);
  return hex32(std::uint32_t(id[0])) + hex32(std::uint32_t(id[1]));
}

// Every rank's file size and CRC-32, on every rank (for the index rank 0 writes last).
struct saved_file {
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
};
inline std::vector<saved_file> gather_file_info(comm::communicator& c, std::uint64_t bytes, std::uint32_t crc) {
  const std::size_t world = std::size_t(c.size()), at = 3 * std::size_t(c.rank());
  std::vector<double> info(3 * world);  // 32-bit pieces travel exactly as doubles
  info[at] = double(bytes >> 32);
  info[at + 1] = double(bytes & 0xffffffffu);
  info[at + 2] = double(crc);
  c.all_gather(info.data(), std::vector<std::size_t>(world, 3));
  std::vector<saved_file> out(world);
  for (std::size_t q = 0; q < world; ++q)
    out[q] = {(std::uint64_t(info[3 * q]) << 32) | std::uint64_t(info[3 * q + 1]), std::uint32_t(info[3 * q + 2])};
  return out;
}

// One entry of index.json's "files", with the elements of each group the file holds, or (ranges == nullptr) of a
// 1-bit checkpoint's "local_files".
inline std::string file_json(int rank, const std::string& file, const saved_file& f,
                             const std::vector<zero::range>* ranges = nullptr) {
  std::string j = "{\"rank\": " + std::to_string(rank) + ", \"file\": " + json::quote(file) +
                  ", \"bytes\": " + std::to_string(f.bytes) + ", \"crc32\": \"" + hex32(f.crc) + "\"";
  if (ranges != nullptr) {
    j += ", \"ranges\": [";
    for (std::size_t g = 0; g < ranges->size(); ++g)
      j += std::string(g ? ", " : "") + "[" + std::to_string((*ranges)[g].begin) + ", " +
           std::to_string((*ranges)[g].end) + "]";
    j += "]";
  }
  return j + "}";
}

// Writes <dir>/index.json crash-safely (rank 0, last): the "metadata" object, then each named array of file_json()
// entries; every key and entry on its own line.
using index_arrays = std::vector<std::pair<const char*, std::vector<std::string>>>;
inline status write_index(const std::string& dir, const meta_map& meta, const index_arrays& arrays) {
  std::string j = "{\n  \"metadata\": {";
  bool first = true;
  for (const auto& kv : meta) {
    j += std::string(first ? "\n" : ",\n") + "    " + json::quote(kv.first) + ": " + json::quote(kv.second);
    first = false;
  }
  j += "\n  }";
  for (const auto& a : arrays) {
    j += ",\n  " + json::quote(a.first) + ": [";
    for (std::size_t i = 0; i < a.second.size(); ++i) j += (i ? ",\n    " : "\n    ") + a.second[i];
    j += "\n  ]";
  }
  j += "\n}\n";
  atomic_file f;
  status st = f.open(dir + "/" + index_name);
  if (st.ok()) st = f.write(j.data(), j.size());
  if (st.ok()) st = f.commit();
  return st;
}

// The saved files a load reads from, each opened (and its CRC-32 checked, where asked) once, when first needed.
class file_cache {
 public:
  file_cache(const index& ix, bool verify_checksums) : ix_(ix), verify_(verify_checksums) {}
  status get(std::size_t q, const shard_reader*& out) {
    auto it = open_.find(q);
    if (it == open_.end()) {
      shard_reader fresh;
      const status st = fresh.open(ix_, ix_.files[q], verify_);
      if (!st.ok()) return st;
      it = open_.emplace(q, std::move(fresh)).first;
    }
    out = &it->second;
    return status::success();
  }

 private:
  const index& ix_;
  bool verify_;
  std::map<std::size_t, shard_reader> open_;
};

}  // namespace detail

// The metadata describing `opt` (index.hpp lists the keys). Every rank computes the same.
template <class Opt>
meta_map describe(const Opt& opt) {
  using Rule = typename Opt::rule_type;
  meta_map m = detail::describe_common(opt, Rule::name, opt.zero().stage, opt.communicator().size());
  m["zero.shard_alignment"] = std::to_string(zero::shard_alignment);
  m["step_options.rounding_seed"] = std::to_string(opt.options().rounding_seed);
  detail::scaler_io<typename Opt::scaler_type>::write_args(opt.scaler_arguments(), m);
  m["groups"] = std::to_string(opt.num_groups());
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t size = opt.layout(g).size;
    const std::string k = detail::describe_group(m, g, size, opt.tensor_sizes(g), Rule::state_names, opt.num_states(g));
    m[k + "shard"] = std::to_string(zero::make_partition(size, opt.communicator().size()).shard);
    detail::write_hparams<Rule>(m, k + "hparams.", opt.hparams(g));
  }
  return m;
}

struct save_options {
  // Extra string metadata, saved as "user.<key>" in the index and in every rank file.
  meta_map user_metadata;
};

namespace detail {

// The index's metadata: the optimizer's (describe()), the save's id and the user's keys.
inline meta_map save_metadata(meta_map described, const std::string& save_id, const save_options& o) {
  described["save_id"] = save_id;
  for (const auto& kv : o.user_metadata) described["user." + kv.first] = kv.second;
  return described;
}

}  // namespace detail

// Writes `opt` to directory `dir` (created if needed; an older checkpoint there is replaced). Collective; throws
// mpopt::error on every rank if any rank fails, and then no index.json exists, so the directory does not load.
template <class Opt>
void save(Opt& opt, const std::string& dir, const save_options& options = {}) {
  comm::communicator& c = opt.communicator();
  const int rank = c.rank(), world = c.size();
  const char* what = "checkpoint save";
  const std::string save_id = detail::begin_save(c, dir, what);
  status st;
  meta_map meta;
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
  // Any throw on this rank (bad_alloc) becomes a failure every rank learns of in agree(), instead of a hang.
  st = detail::status_of([&] {
    meta = detail::save_metadata(describe(opt), save_id, options);
    // This rank's file.
    using Rule = typename Opt::rule_type;
    meta_map file_meta = meta;
    file_meta["rank"] = std::to_string(rank);
    std::vector<tensor_entry> entries;
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      const zero::range r = detail::saved_range(opt.layout(g).size, world, rank);
      const zero::range local = opt.local_range(g);
      if (!r.empty() && !(local.begin <= r.begin && r.end <= local.end))
        return status::invalid("checkpoint save: rank " + std::to_string(rank) + " does not hold group " +
                               std::to_string(g) + "'s saved range");  // unreachable with ZeRO's partition
      file_meta["group." + std::to_string(g) + ".range"] = std::to_string(r.begin) + "," + std::to_string(r.end);
      const std::size_t off = r.empty() ? 0 : r.begin - local.begin;
      entries.push_back(tensor_of(master_tensor(g), r.size(), opt.master(g) + off));
      if constexpr (std::is_same_v<typename Opt::precision_type::master_rounding, kahan_summation>)
        entries.push_back(tensor_of(compensation_tensor(g), r.size(), opt.compensation(g) + off));
      for (int j = 0; j < opt.num_states(g); ++j)
        entries.push_back(tensor_of(state_tensor(g, Rule::state_names[j]), r.size(), opt.state(g, j) + off));
    }
    return write_file(dir + "/" + rank_file_name(rank, world), entries, file_meta, &bytes, &crc);
  });
  detail::agree(c, st, what);

  // Sizes and checksums to rank 0, which writes the index last.
  const std::vector<detail::saved_file> files = detail::gather_file_info(c, bytes, crc);
  if (rank == 0) {
    std::vector<std::string> entries_json;
    for (int q = 0; q < world; ++q) {
      std::vector<zero::range> saved;
      for (std::size_t g = 0; g < opt.num_groups(); ++g)
        saved.push_back(detail::saved_range(opt.layout(g).size, world, q));
      entries_json.push_back(detail::file_json(q, rank_file_name(q, world), files[std::size_t(q)], &saved));
    }
    st = detail::write_index(dir, meta, {{"files", entries_json}});
  }
  detail::agree(c, st, what);
}

struct load_options {
  bool verify_checksums = true;  // CRC-32 of every file a rank reads from (reads each such file once in full)
  bool restore_hparams = true;   // set each group's hyper-parameters from the checkpoint (lr schedule position etc.)
  // Master and state dtypes must match the checkpoint's unless this is set; then values are rounded (nearest even).
  bool convert_dtypes = false;
  // The master rounding ("precision.master_rounding") must match the checkpoint's unless this is set; then a Kahan
  // checkpoint's compensation is folded into the master of an optimizer without one (master + compensation, rounded
  // once to the master type: the weight Kahan held, which a wider master keeps), and a Kahan optimizer loading a
  // checkpoint without one starts its compensation at zero, as a fresh optimizer does.
  bool convert_master_rounding = false;
};

namespace detail {

// Everything load() will put into the optimizer, read and validated.
template <class Opt>
struct staged {
  std::vector<typename Opt::args_type> hparams;
  typename Opt::scaler_state_type scaler{};
  std::int64_t step = 0;
  std::vector<std::vector<typename Opt::master_t>> master;
  std::vector<std::vector<typename Opt::master_t>> compensation;  // kahan_summation only
  std::vector<std::vector<std::vector<typename Opt::state_t>>> states;
};

// Elements `piece` of a Kahan checkpoint's master, its compensation folded in, into out[0, piece.size()).
template <class M>
status read_folded(const shard_reader& f, std::size_t g, zero::range saved, zero::range piece, M* out) {
  std::vector<double> m(piece.size()), c(piece.size());
  status st = f.read(master_tensor(g), saved, piece, m.data(), /*allow_convert=*/true);
  if (st.ok()) st = f.read(compensation_tensor(g), saved, piece, c.data(), /*allow_convert=*/true);
  for (std::size_t i = 0; st.ok() && i < piece.size(); ++i) out[i] = kahan_weight<M>(m[i], c[i]);
  return st;
}

// Elements `piece` of group g's master from file f (which holds `saved` of it) into master[0, piece.size()) and, for
// a Kahan optimizer, its compensation into compensation[0, piece.size()): the checkpoint's, or left as it is (zero)
// when the checkpoint has none. A Kahan checkpoint into an optimizer without one folds the compensation in.
template <bool Kahan, class M>
status read_master(const shard_reader& f, const index& ix, std::size_t g, zero::range saved, zero::range piece,
                   M* master, M* compensation, bool convert_dtypes) {
  if (ix.kahan() && !Kahan) return read_folded(f, g, saved, piece, master);
  status st = f.read(master_tensor(g), saved, piece, master, convert_dtypes);
  if (st.ok() && Kahan && ix.kahan()) st = f.read(compensation_tensor(g), saved, piece, compensation, convert_dtypes);
  return st;
}

// "precision.master_rounding" must be present and, unless load_options::convert_master_rounding, the optimizer's.
inline status check_master_rounding(const meta_map& saved, const meta_map& mine, const std::string& dir,
                                    const load_options& o) {
  const std::string key = "precision.master_rounding";
  std::string rounding;  // required; read_index checked its value and index::kahan() reads it
  status st = meta_get(saved, dir, key, rounding);
  if (st.ok() && !o.convert_master_rounding && !(st = meta_same(saved, mine, dir, key)).ok())
    st.message +=
        " (set load_options::convert_master_rounding to load it: a Kahan compensation is then folded into the master "
        "or started at zero)";
  return st;
}

template <class Opt>
status stage_load(const Opt& opt, const std::string& dir, const load_options& o, staged<Opt>& out) {
  using Rule = typename Opt::rule_type;
  using Scaler = typename Opt::scaler_type;
  index ix;
  status st = read_index(dir, ix);
  if (!st.ok()) return st;
  const meta_map mine = describe(opt);
  const meta_map& saved = ix.metadata;
  std::vector<std::string> keys = {"rule", "scaler", "groups"};
  if (!o.convert_dtypes) keys.insert(keys.end(), {"precision.master", "precision.state"});
  if (!(st = meta_all_same(saved, mine, dir, keys)).ok()) return st;
  if (!(st = check_master_rounding(saved, mine, dir, o)).ok()) return st;
  constexpr bool kahan = std::is_same_v<typename Opt::precision_type::master_rounding, kahan_summation>;
  for (std::size_t g = 0; g < opt.num_groups(); ++g)
    for (const char* f : {"size", "tensor_sizes", "num_states", "states"})
      if (!(st = meta_same(saved, mine, dir, "group." + std::to_string(g) + "." + f)).ok()) return st;

  out.step = ix.step;
  if (!(st = scaler_io<Scaler>::read(saved, dir, out.scaler)).ok()) return st;
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    typename Rule::args a = opt.hparams(g);
    if (!(st = read_hparams<Rule>(saved, dir, "group." + std::to_string(g) + ".hparams.", a)).ok()) return st;
    if (o.restore_hparams && !(st = check_hparams<Rule>(a, dir, "group " + std::to_string(g), opt.num_states(g))).ok())
      return st;
    out.hparams.push_back(a);
  }

  // The data: for each group, the pieces of every saved file that intersect this rank's local range.
  file_cache files(ix, o.verify_checksums);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const zero::range local = opt.local_range(g);
    out.master.emplace_back(local.size());
    if (kahan) out.compensation.emplace_back(local.size());  // zero unless the checkpoint has one
    out.states.emplace_back(std::size_t(opt.num_states(g)), std::vector<typename Opt::state_t>(local.size()));
    for (std::size_t q = 0; q < ix.files.size(); ++q) {
      const zero::range r = ix.files[q].ranges[g];
      const zero::range piece = zero::intersect(local, r);
      if (piece.empty()) continue;
      const shard_reader* f = nullptr;
      if (!(st = files.get(q, f)).ok()) return st;
      const std::size_t at = piece.begin - local.begin;
      st = read_master<kahan>(*f, ix, g, r, piece, out.master.back().data() + at,
                              kahan ? out.compensation.back().data() + at : nullptr, o.convert_dtypes);
      for (int j = 0; st.ok() && j < opt.num_states(g); ++j)
        st = f->read(state_tensor(g, Rule::state_names[j]), r, piece, out.states.back()[std::size_t(j)].data() + at,
                     o.convert_dtypes);
      if (!st.ok()) return st;
    }
  }
  return status::success();
}

}  // namespace detail

// Restores `opt` from directory `dir`, written by save() at any world size and ZeRO stage. Collective. The
// optimizer must have the same rule, scaler kind, groups (sizes, tensor sizes, state count), master/state dtypes
// and master rounding (load_options relaxes the last two); a mismatch, a missing or corrupt file throws mpopt::error on
// every rank, naming the key or file and both values, and leaves the optimizer unchanged.
template <class Opt>
void load(Opt& opt, const std::string& dir, const load_options& options = {}) {
  detail::staged<Opt> s;
  detail::agree(opt.communicator(), detail::status_of([&] { return detail::stage_load(opt, dir, options, s); }),
                "checkpoint load");
  // Commit: nothing below can fail (sizes and values were checked above).
  if (options.restore_hparams)
    for (std::size_t g = 0; g < opt.num_groups(); ++g) opt.set_hparams(g, s.hparams[g]);
  opt.set_step_count(s.step);
  opt.set_scaler_state(s.scaler);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    opt.set_local_master(g, s.master[g].data(), s.master[g].size());
    if constexpr (std::is_same_v<typename Opt::precision_type::master_rounding, kahan_summation>)
      opt.set_local_compensation(g, s.compensation[g].data(), s.compensation[g].size());
    for (int j = 0; j < opt.num_states(g); ++j)
      opt.set_state(g, j, s.states[g][std::size_t(j)].data(), s.master[g].size());
  }
}

}  // namespace mpopt::checkpoint
