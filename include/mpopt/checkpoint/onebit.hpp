// Checkpoints of mpopt::onebit::optimizer (1-bit Adam, 0/1 Adam, 1-bit LAMB): save() and load(), both collective
// over the optimizer's communicator. Overloads of checkpoint.hpp's save() and load(); the same options.
//
// The state is the same on every rank except the error-feedback buffers and, in 0/1 Adam's local phase between
// synchronisations, the weights and momentum. So rank 0 writes the shared state once and every rank its own part:
//   <dir>/state.safetensors                    rank 0: "group<g>.master", "group<g>.state.<name>"; 0/1 Adam also
//                                              "group<g>.sync_point" (F32); 1-bit LAMB "group<g>.lamb.<field>" (F64,
//                                              one element per tensor; fields below)
//   <dir>/local-rank-<r>-of-<W>.safetensors    rank r: "errors<i>.worker" (F32, the padded length at W) and
//                                              "errors<i>.server" (F32, the chunk), i < num_error_buffers(); 0/1 Adam
//                                              also its own "group<g>.master" and "group<g>.state.exp_avg"
//   <dir>/index.json                           rank 0, written last
// index.json is index.hpp's format with the state file as the one saving rank (zero.stage 0, zero.world_size 1),
// so read_index() and consolidate() read it, plus "local_files": [{"rank", "file", "bytes", "crc32"}], one per rank.
// The metadata (index and every file) adds to index.hpp's keys:
//   onebit.format_version, onebit.world_size, onebit.error_buffers, onebit.errors.<i>.size,
//   onebit.options.{accept_unverified_precision,bucket_elements}, group.<g>.tensors (1-bit LAMB),
//   group.<g>.accumulated_lr and onebit.schedule.{var_interval,var_counter,local_step_interval,local_step_counter}
//   (0/1 Adam).
//
// The per-rank part is only meaningful at the world size that made it (the error buffers' padding and chunks depend
// on it). Loaded at the saved world size, each rank restores its own, and resuming is bit-identical to never
// stopping. At another world size the error buffers are zeroed (as DeepSpeed always does) and 0/1 Adam's ranks all
// start from rank 0's weights and momentum (the others' local steps since the last synchronisation are lost, as in
// DeepSpeed, which saves rank 0 only); load() says so in its result. consolidate() gives rank 0's weights.
//
// Not saved: momentum masks (set_momentum_mask is configuration, like the groups) and the scaler's arguments (the
// optimizer does not expose them; they are constructor arguments).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../numeric/traits.hpp"
#include "../onebit/optimizer.hpp"
#include "../rule/onebit.hpp"
#include "../zero/partition.hpp"
#include "checkpoint.hpp"
#include "index.hpp"
#include "json.hpp"
#include "safetensors.hpp"

namespace mpopt::checkpoint {

template <>
struct hparam_fields<onebit_adam> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("eps", a.eps), f("weight_decay", a.weight_decay);
    f("freeze_step", a.freeze_step);
  }
};
template <>
struct hparam_fields<zero_one_adam> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("eps", a.eps), f("weight_decay", a.weight_decay);
    f("var_freeze_step", a.var_freeze_step), f("var_update_scaler", a.var_update_scaler);
    f("local_step_scaler", a.local_step_scaler), f("local_step_clipper", a.local_step_clipper);
  }
};
template <>
struct hparam_fields<onebit_lamb> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("beta1", a.beta1), f("beta2", a.beta2), f("eps", a.eps), f("weight_decay", a.weight_decay);
    f("freeze_step", a.freeze_step), f("max_coeff", a.max_coeff), f("min_coeff", a.min_coeff);
    f("coeff_beta", a.coeff_beta), f("factor_max", a.factor_max), f("factor_min", a.factor_min);
    f("factor_threshold", a.factor_threshold);
  }
};

inline constexpr int onebit_format_version = 1;
inline constexpr const char* onebit_state_file = "state.safetensors";

inline std::string local_file_name(int rank, int world) {
  return "local-" + rank_file_name(rank, world);
}
inline std::string worker_error_tensor(std::size_t i) {
  return "errors" + std::to_string(i) + ".worker";
}
inline std::string server_error_tensor(std::size_t i) {
  return "errors" + std::to_string(i) + ".server";
}
inline std::string sync_point_tensor(std::size_t g) {
  return "group" + std::to_string(g) + ".sync_point";
}
// 1-bit LAMB's per-tensor state, in lamb_tensor_state's order.
inline constexpr const char* lamb_state_fields[4] = {"coeff_freeze", "last_factor", "scaling_coeff", "last_coeff"};
inline std::string lamb_state_tensor(std::size_t g, int field) {
  return "group" + std::to_string(g) + ".lamb." + lamb_state_fields[field];
}

// What load() did with the per-rank state.
struct onebit_load_result {
  // true: every rank restored its own error buffers (0/1 Adam: and its own weights and momentum). false: saved at
  // another world size; the error buffers were zeroed (0/1 Adam: every rank took rank 0's weights and momentum).
  bool errors_restored = false;
  int saved_world_size = 0;
  std::int64_t step = 0;
};

namespace detail {

template <class T>
double& lamb_field(T& ts, int field) {
  switch (field) {
    case 0: return ts.coeff_freeze;
    case 1: return ts.last_factor;
    case 2: return ts.scaling_coeff;
    default: return ts.last_coeff;
  }
}

}  // namespace detail

// The metadata describing `opt` (the keys at the top and in index.hpp). Every rank computes the same.
// master_rounding is "nearest", the only one the 1-bit optimizers take; there are no scaler_args (the optimizer does
// not expose them).
template <class Rule, class Prec, class Scaler>
meta_map describe(const onebit::optimizer<Rule, Prec, Scaler>& opt) {
  meta_map m = detail::describe_common(opt, Rule::name, 0, 1);  // the replicated state is written once
  m["onebit.format_version"] = std::to_string(onebit_format_version);
  m["onebit.world_size"] = std::to_string(opt.communicator().size());
  m["onebit.options.accept_unverified_precision"] = detail::to_text(opt.onebit_options().accept_unverified_precision);
  m["onebit.options.bucket_elements"] = std::to_string(opt.onebit_options().bucket_elements);
  m["onebit.error_buffers"] = std::to_string(opt.num_error_buffers());
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i)
    m["onebit.errors." + std::to_string(i) + ".size"] = std::to_string(opt.error_layout(i).n);
  if constexpr (std::is_same_v<Rule, zero_one_adam>) {
    const onebit::schedule& s = opt.current_schedule();
    m["onebit.schedule.var_interval"] = std::to_string(s.var_interval);
    m["onebit.schedule.var_counter"] = std::to_string(s.var_counter);
    m["onebit.schedule.local_step_interval"] = std::to_string(s.local_step_interval);
    m["onebit.schedule.local_step_counter"] = std::to_string(s.local_step_counter);
  }
  m["groups"] = std::to_string(opt.num_groups());
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::string k =
        detail::describe_group(m, g, opt.size(g), opt.tensor_sizes(g), Rule::state_names, Rule::max_states);
    detail::write_hparams<Rule>(m, k + "hparams.", opt.hparams(g));
    if constexpr (std::is_same_v<Rule, zero_one_adam>) m[k + "accumulated_lr"] = format_double(opt.accumulated_lr(g));
    if constexpr (std::is_same_v<Rule, onebit_lamb>) m[k + "tensors"] = std::to_string(opt.lamb_state(g).size());
  }
  return m;
}

namespace detail {

// Rank 0's file: the replicated state.
template <class Rule, class Prec, class Scaler>
status write_onebit_state(const onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& path,
                          const meta_map& meta, std::uint64_t& bytes, std::uint32_t& crc) {
  std::vector<tensor_entry> entries;
  std::vector<std::vector<double>> lamb;  // the per-tensor fields, gathered into arrays
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::uint64_t n = opt.size(g);
    entries.push_back(tensor_of(master_tensor(g), n, opt.master(g)));
    for (int j = 0; j < Rule::max_states; ++j)
      entries.push_back(tensor_of(state_tensor(g, Rule::state_names[j]), n, opt.state(g, j)));
    if constexpr (std::is_same_v<Rule, zero_one_adam>)
      entries.push_back(tensor_of(sync_point_tensor(g), n, opt.sync_point(g)));
    if constexpr (std::is_same_v<Rule, onebit_lamb>) {
      const auto& ts = opt.lamb_state(g);
      for (int f = 0; f < 4; ++f) {
        lamb.emplace_back();
        for (auto t : ts) lamb.back().push_back(lamb_field(t, f));
      }
    }
  }
  if constexpr (std::is_same_v<Rule, onebit_lamb>) {
    std::size_t at = 0;  // `lamb` is complete: its data pointers stay put
    for (std::size_t g = 0; g < opt.num_groups(); ++g)
      for (int f = 0; f < 4; ++f, ++at)
        entries.push_back(tensor_of(lamb_state_tensor(g, f), lamb[at].size(), lamb[at].data()));
  }
  meta_map file_meta = meta;
  file_meta["rank"] = "0";
  return write_file(path, entries, file_meta, &bytes, &crc);
}

// Every rank's file: its error buffers; 0/1 Adam's weights and momentum, which local steps make differ per rank
// (the variance is frozen then, and the sync point and the lr sum are the same on every rank).
template <class Rule, class Prec, class Scaler>
status write_onebit_rank_file(const onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& path,
                              const meta_map& meta, int rank, std::uint64_t& bytes, std::uint32_t& crc) {
  std::vector<tensor_entry> entries;
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i) {
    const onebit::error_feedback& e = opt.errors(i);
    entries.push_back(tensor_of(worker_error_tensor(i), e.worker.size(), e.worker.data()));
    entries.push_back(tensor_of(server_error_tensor(i), e.server.size(), e.server.data()));
  }
  if constexpr (std::is_same_v<Rule, zero_one_adam>) {
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      entries.push_back(tensor_of(master_tensor(g), opt.size(g), opt.master(g)));
      entries.push_back(tensor_of(state_tensor(g, Rule::state_names[0]), opt.size(g), opt.state(g, 0)));
    }
  }
  meta_map file_meta = meta;
  file_meta["rank"] = std::to_string(rank);
  return write_file(path, entries, file_meta, &bytes, &crc);
}

}  // namespace detail

// Writes `opt` to directory `dir` (created if needed; an older checkpoint there is replaced). Collective; throws
// mpopt::error on every rank if any rank fails, and then no index.json exists, so the directory does not load.
template <class Rule, class Prec, class Scaler>
void save(const onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {}) {
  comm::communicator& c = opt.communicator();
  const int rank = c.rank(), world = c.size();
  const char* what = "checkpoint save";
  const std::string save_id = detail::begin_save(c, dir, what);
  status st;

  meta_map meta;
  detail::saved_file state, own;
  st = detail::status_of([&] {
    meta = detail::save_metadata(describe(opt), save_id, options);
    status s;
    if (rank == 0) s = detail::write_onebit_state(opt, dir + "/" + onebit_state_file, meta, state.bytes, state.crc);
    if (s.ok())
      s = detail::write_onebit_rank_file(opt, dir + "/" + local_file_name(rank, world), meta, rank, own.bytes, own.crc);
    return s;
  });
  detail::agree(c, st, what);

  // Sizes and checksums to rank 0, which writes the index last.
  const std::vector<detail::saved_file> files = detail::gather_file_info(c, own.bytes, own.crc);
  if (rank == 0) {
    std::vector<zero::range> all;  // the state file holds all of every group
    for (std::size_t g = 0; g < opt.num_groups(); ++g) all.push_back({0, opt.size(g)});
    std::vector<std::string> local;
    for (int q = 0; q < world; ++q)
      local.push_back(detail::file_json(q, local_file_name(q, world), files[std::size_t(q)]));
    st = detail::write_index(
        dir, meta, {{"files", {detail::file_json(0, onebit_state_file, state, &all)}}, {"local_files", local}});
  }
  detail::agree(c, st, what);
}

// Without this, a non-const optimizer would pick checkpoint.hpp's generic save(Opt&) (an exact match).
template <class Rule, class Prec, class Scaler>
void save(onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir, const save_options& options = {}) {
  save(std::as_const(opt), dir, options);
}

namespace detail {

// Everything load() will put into the optimizer, read and validated.
template <class Opt>
struct onebit_staged {
  std::vector<typename Opt::args_type> hparams;
  typename Opt::scaler_state_type scaler{};
  std::int64_t step = 0;
  onebit::schedule schedule;
  std::vector<std::vector<typename Opt::master_t>> master;
  std::vector<std::vector<std::vector<typename Opt::state_t>>> states;
  std::vector<std::vector<float>> sync_point;
  std::vector<double> accumulated_lr;
  std::vector<std::vector<typename Opt::lamb_tensor_state>> lamb;
  std::vector<std::vector<float>> worker, server;  // empty unless the errors are restored
  int saved_world = 0;
  bool errors_restored = false;
};

// "local_files" of <dir>/index.json: one entry per saving rank, in rank order.
inline status read_local_files(const index& ix, int world, std::vector<file_entry>& out) {
  out.clear();
  const std::string path = ix.dir + "/" + index_name;
  std::string text;
  status st = read_text_file(path, text);
  json::value root;
  if (st.ok()) st = json::parse(text, root);
  if (!st.ok()) return status::invalid(path + ": " + st.message);
  const json::value* files = root.is_object() ? root.find("local_files") : nullptr;
  if (files == nullptr || !files->is_array() || files->items.size() != std::size_t(world))
    return status::invalid(path + ": \"local_files\" must list one file for each of the onebit.world_size = " +
                           std::to_string(world) + " ranks");
  for (std::size_t q = 0; q < files->items.size(); ++q) {
    file_entry e;
    st = read_file_entry(files->items[q], q, path + ": local_files[" + std::to_string(q) + "]: ", e);
    if (!st.ok()) return st;
    out.push_back(std::move(e));
  }
  return status::success();
}

template <class Rule, class Prec, class Scaler>
status stage_onebit_load(const onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir,
                         const load_options& o, onebit_staged<onebit::optimizer<Rule, Prec, Scaler>>& out) {
  index ix;
  status st = read_index(dir, ix);
  if (!st.ok()) return st;
  const meta_map mine = describe(opt);
  const meta_map& saved = ix.metadata;
  // The rule first: a checkpoint of another optimizer fails there, before any 1-bit key is missed.
  std::vector<std::string> keys = {"rule", "scaler", "precision.master_rounding", "onebit.format_version", "groups"};
  if (!o.convert_dtypes) keys.insert(keys.end(), {"precision.master", "precision.state"});
  for (std::size_t g = 0; g < opt.num_groups(); ++g)
    for (const char* f : {"size", "num_states", "states"}) keys.push_back("group." + std::to_string(g) + "." + f);
  if constexpr (std::is_same_v<Rule, onebit_lamb>)
    for (std::size_t g = 0; g < opt.num_groups(); ++g) keys.push_back("group." + std::to_string(g) + ".tensors");
  keys.push_back("onebit.error_buffers");
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i)
    keys.push_back("onebit.errors." + std::to_string(i) + ".size");
  if (!(st = meta_all_same(saved, mine, dir, keys)).ok()) return st;
  if (ix.files.size() != 1)
    return meta_error(dir, "zero.world_size", "a 1-bit checkpoint has one state file (\"1\")",
                      std::to_string(ix.files.size()));

  // Scalars.
  if (!(st = meta_read(saved, dir, "onebit.world_size", out.saved_world)).ok()) return st;
  if (out.saved_world < 1)
    return meta_error(dir, "onebit.world_size", "it must be >= 1", std::to_string(out.saved_world));
  out.step = ix.step;
  if (!(st = scaler_io<Scaler>::read(saved, dir, out.scaler)).ok()) return st;
  if constexpr (std::is_same_v<Rule, zero_one_adam>) {
    onebit::schedule& s = out.schedule;
    const std::pair<const char*, std::int64_t*> fields[] = {{"var_interval", &s.var_interval},
                                                            {"var_counter", &s.var_counter},
                                                            {"local_step_interval", &s.local_step_interval},
                                                            {"local_step_counter", &s.local_step_counter}};
    for (const auto& f : fields) {
      const std::string key = std::string("onebit.schedule.") + f.first;
      if (!(st = meta_read(saved, dir, key, *f.second)).ok()) return st;
      const bool interval = std::string(f.first).find("interval") != std::string::npos;
      if (*f.second < (interval ? 1 : 0))
        return meta_error(dir, key, interval ? "an interval must be >= 1" : "a counter must be >= 0",
                          std::to_string(*f.second));
    }
  }
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::string k = "group." + std::to_string(g) + ".";
    typename Rule::args a = opt.hparams(g);
    if (!(st = read_hparams<Rule>(saved, dir, k + "hparams.", a)).ok()) return st;
    if (o.restore_hparams && !(st = check_hparams<Rule>(a, dir, "group " + std::to_string(g))).ok()) return st;
    out.hparams.push_back(a);
    if constexpr (std::is_same_v<Rule, zero_one_adam>) {
      double lr = 0;
      if (!(st = meta_read(saved, dir, k + "accumulated_lr", lr)).ok()) return st;
      if (!(lr >= 0 && lr <= std::numeric_limits<double>::max()))
        return meta_error(dir, k + "accumulated_lr", "it must be finite and >= 0", format_double(lr));
      out.accumulated_lr.push_back(lr);
    }
  }

  // The replicated state, from the state file (every rank reads it).
  shard_reader state;
  if (!(st = state.open(ix, ix.files[0], o.verify_checksums)).ok()) return st;
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t n = opt.size(g);
    const zero::range all{0, n};
    out.master.emplace_back(n);
    if (!(st = state.read(master_tensor(g), all, all, out.master.back().data(), o.convert_dtypes)).ok()) return st;
    out.states.emplace_back();
    for (int j = 0; j < Rule::max_states; ++j) {
      out.states.back().emplace_back(n);
      st = state.read(state_tensor(g, Rule::state_names[j]), all, all, out.states.back().back().data(),
                      o.convert_dtypes);
      if (!st.ok()) return st;
    }
    if constexpr (std::is_same_v<Rule, zero_one_adam>) {
      out.sync_point.emplace_back(n);
      if (!(st = state.read(sync_point_tensor(g), all, all, out.sync_point.back().data(), false)).ok()) return st;
    }
    if constexpr (std::is_same_v<Rule, onebit_lamb>) {
      const std::size_t tensors = opt.lamb_state(g).size();
      out.lamb.emplace_back(tensors);
      std::vector<double> v(tensors);
      for (int f = 0; f < 4; ++f) {
        if (!(st = state.read(lamb_state_tensor(g, f), {0, tensors}, {0, tensors}, v.data(), false)).ok()) return st;
        for (std::size_t t = 0; t < tensors; ++t) lamb_field(out.lamb.back()[t], f) = v[t];
      }
    }
  }

  // This rank's own part, only at the world size that made it.
  comm::communicator& c = opt.communicator();
  if (out.saved_world != c.size()) return status::success();
  std::vector<file_entry> files;
  if (!(st = read_local_files(ix, out.saved_world, files)).ok()) return st;
  shard_reader own;
  if (!(st = own.open(ix, files[std::size_t(c.rank())], o.verify_checksums)).ok()) return st;
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i) {
    const onebit::compressed_layout& l = opt.error_layout(i);
    out.worker.emplace_back(l.padded);
    out.server.emplace_back(l.chunk);
    st = own.read(worker_error_tensor(i), {0, l.padded}, {0, l.padded}, out.worker.back().data(), false);
    if (st.ok()) st = own.read(server_error_tensor(i), {0, l.chunk}, {0, l.chunk}, out.server.back().data(), false);
    if (!st.ok()) return st;
  }
  if constexpr (std::is_same_v<Rule, zero_one_adam>) {
    for (std::size_t g = 0; g < opt.num_groups(); ++g) {
      const zero::range all{0, opt.size(g)};
      st = own.read(master_tensor(g), all, all, out.master[g].data(), o.convert_dtypes);
      if (st.ok())
        st = own.read(state_tensor(g, Rule::state_names[0]), all, all, out.states[g][0].data(), o.convert_dtypes);
      if (!st.ok()) return st;
    }
  }
  out.errors_restored = true;
  return status::success();
}

}  // namespace detail

// Restores `opt` from directory `dir`, written by save() at any world size. Collective. The optimizer must have the
// same rule, scaler kind, groups (count, sizes; 1-bit LAMB: tensor counts) and master/state dtypes (or
// load_options::convert_dtypes); a mismatch, a missing, truncated or corrupt file throws mpopt::error on every rank,
// naming the key or file and both values, and leaves the optimizer unchanged. At the saved world size every rank
// restores its own error buffers (0/1 Adam: and its own weights and momentum); at another they are zeroed (0/1 Adam:
// every rank takes rank 0's weights and momentum) and result.errors_restored is false.
template <class Rule, class Prec, class Scaler>
onebit_load_result load(onebit::optimizer<Rule, Prec, Scaler>& opt, const std::string& dir,
                        const load_options& options = {}) {
  detail::onebit_staged<onebit::optimizer<Rule, Prec, Scaler>> s;
  detail::agree(opt.communicator(), detail::status_of([&] { return detail::stage_onebit_load(opt, dir, options, s); }),
                "checkpoint load");
  // Commit: nothing below can fail (sizes and values were checked above).
  if (options.restore_hparams)
    for (std::size_t g = 0; g < opt.num_groups(); ++g) opt.set_hparams(g, s.hparams[g]);
  opt.set_step_count(s.step);
  opt.set_scaler_state(s.scaler);
  if constexpr (std::is_same_v<Rule, zero_one_adam>) opt.set_schedule(s.schedule);
  for (std::size_t g = 0; g < opt.num_groups(); ++g) {
    const std::size_t n = opt.size(g);
    opt.set_master(g, s.master[g].data(), n);
    for (int j = 0; j < Rule::max_states; ++j) opt.set_state(g, j, s.states[g][std::size_t(j)].data(), n);
    if constexpr (std::is_same_v<Rule, zero_one_adam>)
      opt.set_sync_point(g, s.sync_point[g].data(), n, s.accumulated_lr[g]);
    if constexpr (std::is_same_v<Rule, onebit_lamb>) opt.set_lamb_state(g, s.lamb[g]);
  }
  for (std::size_t i = 0; i < opt.num_error_buffers(); ++i) {
    onebit::error_feedback& e = opt.errors(i);
    if (s.errors_restored) {
      std::copy(s.worker[i].begin(), s.worker[i].end(), e.worker.data());
      std::copy(s.server[i].begin(), s.server[i].end(), e.server.data());
    } else {
      e.reset();
    }
  }
  onebit_load_result r;
  r.errors_restored = s.errors_restored;
  r.saved_world_size = s.saved_world;
  r.step = s.step;
  return r;
}

}  // namespace mpopt::checkpoint
