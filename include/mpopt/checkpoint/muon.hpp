// Checkpoints of mpopt::muon_optimizer (host): save() and load(), overloads of checkpoint.hpp's, with its options;
// both collective over the optimizer's communicator.
//
// Muon keeps every tensor whole on one owner rank (muon.hpp: owner()), matrices and aux (AdamW) tensors alike, so
// the unit of a checkpoint is the tensor. In index.hpp's format each tensor is one "group" k, numbered in the
// optimizer's order (matrix groups' matrices, then aux groups' tensors), and each rank writes the tensors it owns:
//   <dir>/rank-<r>-of-<W>.safetensors   rank r: "group<k>.master", with a kahan_summation master
//                                       "group<k>.master_compensation", and "group<k>.state.<name>" (matrices:
//                                       momentum_buffer; aux: exp_avg, exp_avg_sq[, max_exp_avg_sq]), 1-D: the whole
//                                       tensor for each k it owns, empty for the others (at stage 0 too: the
//                                       replicas split the writing)
//   <dir>/index.json                    rank 0, written last; files[q].ranges[k] is [0, n] for k's owner q, [0, 0]
//                                       before it and [n, n] after it, so read_index() and consolidate() read it
// The metadata adds to index.hpp's keys (group.<k>.* describe tensor k):
//   muon.format_version, muon.gemm (fp32 | bf16), muon.matrix_groups, muon.aux_groups,
//   muon.matrix_group.<g>.{shapes ("24x40,40x24"), hparams.<field>} (adjust_lr by name),
//   muon.aux_group.<g>.{tensor_sizes, states, hparams.<field>}, group.<k>.{tensor ("matrix.<g>.<t>" or
//   "aux.<g>.<t>"), shape ("rows,cols" or "n"), owner}.
// Crash safety, the CRC-32s and the all-or-nothing load are checkpoint.hpp's (the same helpers).
//
// load() works at any world size and ZeRO stage 0-2: each rank reads the tensors it holds from their saving owners'
// files, then the owners' params are all-gathered as after a step. A Muon step's arithmetic per tensor does not
// depend on the world size (muon.hpp), so resuming is bit-identical to never stopping, at any world size and stage.
//
// The Gemm type (muon_gemm<float> or <bf16_t>) is recorded but not checked: it is compute policy, like the grad
// dtype (the state is the same bytes under either), so a checkpoint may continue under the other one, e.g. moved
// between a GPU's bf16 tensor-core GEMMs and fp32 host ones. Only the same Gemm resumes bit for bit.
// A Kahan master's compensation is saved, resharded and crosses master roundings (load_options::
// convert_master_rounding) as in checkpoint.hpp, with its helpers. Not saved, as there: the param copy (load()
// rewrites it from the master), step_options (recorded), and the scaler's arguments (recorded; they are constructor
// arguments).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/communicator.hpp"
#include "../error.hpp"
#include "../muon.hpp"
#include "../numeric/traits.hpp"
#include "../rule/adam.hpp"
#include "../rule/muon.hpp"
#include "../zero/partition.hpp"
#include "checkpoint.hpp"
#include "index.hpp"
#include "json.hpp"
#include "safetensors.hpp"

namespace mpopt::checkpoint {

// adjust_lr, an enum, is saved by name beside these ("hparams.adjust_lr").
template <>
struct hparam_fields<muon> {
  template <class A, class F>
  static void visit(A& a, F&& f) {
    f("lr", a.lr), f("momentum", a.momentum), f("nesterov", a.nesterov), f("weight_decay", a.weight_decay);
    f("ns_coefficients.a", a.ns_coefficients.a), f("ns_coefficients.b", a.ns_coefficients.b);
    f("ns_coefficients.c", a.ns_coefficients.c), f("ns_steps", a.ns_steps), f("eps", a.eps);
  }
};

inline constexpr int muon_format_version = 1;

namespace detail {

// A tensor of a muon_optimizer; its position in muon_tensors() is its group index k in the checkpoint.
struct muon_tensor {
  muon_part part = muon_part::matrices;
  std::size_t group = 0, tensor = 0;
};

template <class Opt>
std::vector<muon_tensor> muon_tensors(const Opt& opt) {
  std::vector<muon_tensor> out;
  for (muon_part part : {muon_part::matrices, muon_part::aux}) {
    const std::size_t groups = part == muon_part::matrices ? opt.num_matrix_groups() : opt.num_aux_groups();
    for (std::size_t g = 0; g < groups; ++g)
      for (std::size_t t = 0; t < opt.num_tensors(part, g); ++t) out.push_back({part, g, t});
  }
  return out;
}

inline const char* const* muon_state_names(muon_part part) {
  return part == muon_part::matrices ? muon::state_names : adamw::state_names;
}

inline std::string muon_group_key(muon_part part, std::size_t g) {
  return std::string(part == muon_part::matrices ? "muon.matrix_group." : "muon.aux_group.") + std::to_string(g) + ".";
}

inline std::string join_shapes(const std::vector<matrix_shape>& shapes) {
  std::string s;
  for (const matrix_shape& m : shapes)
    s += (s.empty() ? "" : ",") + std::to_string(m.rows) + "x" + std::to_string(m.cols);
  return s;
}

inline status parse_adjust_lr(const meta_map& m, const std::string& dir, const std::string& key, muon_adjust_lr& out) {
  std::string v;
  status st = meta_get(m, dir, key, v);
  if (!st.ok()) return st;
  for (muon_adjust_lr a : {muon_adjust_lr::original, muon_adjust_lr::match_rms_adamw})
    if (v == to_string(a)) {
      out = a;
      return status::success();
    }
  return meta_error(dir, key, "it must be \"original\" or \"match_rms_adamw\"", v);
}

}  // namespace detail

// The metadata describing `opt` (the keys at the top and in index.hpp). Every rank computes the same, except that
// group.<k>.owner is the owner at this world size.
template <class Prec, class Scaler, class Gemm>
meta_map describe(const muon_optimizer<Prec, Scaler, Gemm>& opt) {
  using Opt = muon_optimizer<Prec, Scaler, Gemm>;
  meta_map m = detail::describe_common(opt, muon::name, opt.zero().stage, opt.communicator().size());
  m["step_options.rounding_seed"] = std::to_string(opt.options().rounding_seed);
  detail::scaler_io<Scaler>::write_args(opt.scaler_arguments(), m);

  m["muon.format_version"] = std::to_string(muon_format_version);
  m["muon.gemm"] = dtype_name<typename Opt::gemm_t>();
  m["muon.matrix_groups"] = std::to_string(opt.num_matrix_groups());
  m["muon.aux_groups"] = std::to_string(opt.num_aux_groups());
  for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) {
    const std::string k = detail::muon_group_key(muon_part::matrices, g);
    m[k + "shapes"] = detail::join_shapes(opt.matrix_shapes(g));
    const muon::args a = opt.matrix_hparams(g);
    detail::write_hparams<muon>(m, k + "hparams.", a);
    m[k + "hparams.adjust_lr"] = to_string(a.adjust_lr);
  }
  for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) {
    const std::string k = detail::muon_group_key(muon_part::aux, g);
    std::vector<std::size_t> sizes;
    for (std::size_t t = 0; t < opt.num_tensors(muon_part::aux, g); ++t)
      sizes.push_back(opt.tensor_size(muon_part::aux, g, t));
    m[k + "tensor_sizes"] = join_sizes(sizes);
    m[k + "states"] = join_names(adamw::state_names, opt.num_states(muon_part::aux, g));
    detail::write_hparams<adamw>(m, k + "hparams.", opt.aux_hparams(g));
  }

  const std::vector<detail::muon_tensor> tensors = detail::muon_tensors(opt);
  m["groups"] = std::to_string(tensors.size());
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const detail::muon_tensor& x = tensors[k];
    const std::size_t n = opt.tensor_size(x.part, x.group, x.tensor);
    const bool matrix = x.part == muon_part::matrices;
    const std::string key =
        detail::describe_group(m, k, n, {}, detail::muon_state_names(x.part), opt.num_states(x.part, x.group));
    m[key + "tensor"] =
        std::string(matrix ? "matrix." : "aux.") + std::to_string(x.group) + "." + std::to_string(x.tensor);
    if (matrix) {
      const matrix_shape& s = opt.matrix_shapes(x.group)[x.tensor];
      m[key + "shape"] = std::to_string(s.rows) + "," + std::to_string(s.cols);
    } else {
      m[key + "shape"] = std::to_string(n);
    }
    m[key + "owner"] = std::to_string(opt.owner(x.part, x.group, x.tensor));
  }
  return m;
}

// Writes `opt` to directory `dir` (created if needed; an older checkpoint there is replaced). Collective; throws
// mpopt::error on every rank if any rank fails, and then no index.json exists, so the directory does not load.
template <class Prec, class Scaler, class Gemm>
void save(const muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const save_options& options = {}) {
  comm::communicator& c = opt.communicator();
  const int rank = c.rank(), world = c.size();
  const char* what = "checkpoint save";
  const std::string save_id = detail::begin_save(c, dir, what);
  status st;

  meta_map meta;
  std::vector<detail::muon_tensor> tensors;
  detail::saved_file own;
  st = detail::status_of([&] {
    meta = detail::save_metadata(describe(opt), save_id, options);
    tensors = detail::muon_tensors(opt);
    meta_map file_meta = meta;
    file_meta["rank"] = std::to_string(rank);
    std::vector<tensor_entry> entries;
    for (std::size_t k = 0; k < tensors.size(); ++k) {  // as index.hpp says: every group, empty where not owned
      const detail::muon_tensor& x = tensors[k];
      const bool mine = opt.owner(x.part, x.group, x.tensor) == rank;
      const std::uint64_t n = mine ? opt.tensor_size(x.part, x.group, x.tensor) : 0;
      entries.push_back(tensor_of(master_tensor(k), n, mine ? opt.master(x.part, x.group, x.tensor) : nullptr));
      if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
        entries.push_back(
            tensor_of(compensation_tensor(k), n, mine ? opt.compensation(x.part, x.group, x.tensor) : nullptr));
      for (int j = 0; j < opt.num_states(x.part, x.group); ++j)
        entries.push_back(tensor_of(state_tensor(k, detail::muon_state_names(x.part)[j]), n,
                                    mine ? opt.state(x.part, x.group, x.tensor, j) : nullptr));
    }
    return write_file(dir + "/" + rank_file_name(rank, world), entries, file_meta, &own.bytes, &own.crc);
  });
  detail::agree(c, st, what);

  // Sizes and checksums to rank 0, which writes the index last. Rank q's file holds all of tensor k where q owns it,
  // none of it elsewhere: [0, 0] before the owner, [n, n] after, so the ranges tile as index.hpp requires.
  const std::vector<detail::saved_file> files = detail::gather_file_info(c, own.bytes, own.crc);
  if (rank == 0) {
    std::vector<std::string> entries_json;
    for (int q = 0; q < world; ++q) {
      std::vector<zero::range> ranges;
      for (const detail::muon_tensor& x : tensors) {
        const int owner = opt.owner(x.part, x.group, x.tensor);
        const std::size_t n = opt.tensor_size(x.part, x.group, x.tensor);
        ranges.push_back({q <= owner ? 0 : n, q < owner ? 0 : n});
      }
      entries_json.push_back(detail::file_json(q, rank_file_name(q, world), files[std::size_t(q)], &ranges));
    }
    st = detail::write_index(dir, meta, {{"files", entries_json}});
  }
  detail::agree(c, st, what);
}

// Without this, a non-const optimizer would pick checkpoint.hpp's generic save(Opt&) (an exact match).
template <class Prec, class Scaler, class Gemm>
void save(muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const save_options& options = {}) {
  save(std::as_const(opt), dir, options);
}

namespace detail {

// Everything load() will put into the optimizer, read and validated. master, compensation (kahan_summation only)
// and states per checkpoint group k, empty where this rank does not hold tensor k.
template <class Opt>
struct muon_staged {
  std::vector<muon::args> matrix_hparams;
  std::vector<adamw::args> aux_hparams;
  typename Opt::scaler_state_type scaler{};
  std::int64_t step = 0;
  std::vector<std::vector<typename Opt::master_t>> master, compensation;
  std::vector<std::vector<std::vector<typename Opt::state_t>>> states;
};

template <class Prec, class Scaler, class Gemm>
status stage_muon_load(const muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const load_options& o,
                       muon_staged<muon_optimizer<Prec, Scaler, Gemm>>& out) {
  index ix;
  status st = read_index(dir, ix);
  if (!st.ok()) return st;
  const meta_map mine = describe(opt);
  const meta_map& saved = ix.metadata;
  // The rule first: a checkpoint of another optimizer fails there, before any Muon key is missed. Then the layout
  // by Muon's groups (the message names the matrix group and its shapes), then per tensor.
  if (!(st = meta_all_same(saved, mine, dir, {"rule", "scaler"})).ok()) return st;
  if (!(st = check_master_rounding(saved, mine, dir, o)).ok()) return st;
  std::vector<std::string> keys = {"muon.format_version"};
  if (!o.convert_dtypes) keys.insert(keys.end(), {"precision.master", "precision.state"});
  keys.insert(keys.end(), {"muon.matrix_groups", "muon.aux_groups"});
  for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g)
    keys.push_back(muon_group_key(muon_part::matrices, g) + "shapes");
  for (std::size_t g = 0; g < opt.num_aux_groups(); ++g)
    for (const char* f : {"tensor_sizes", "states"}) keys.push_back(muon_group_key(muon_part::aux, g) + f);
  keys.push_back("groups");
  const std::vector<muon_tensor> tensors = muon_tensors(opt);
  for (std::size_t k = 0; k < tensors.size(); ++k)
    for (const char* f : {"size", "states"}) keys.push_back("group." + std::to_string(k) + "." + f);
  if (!(st = meta_all_same(saved, mine, dir, keys)).ok()) return st;

  out.step = ix.step;
  if (!(st = scaler_io<Scaler>::read(saved, dir, out.scaler)).ok()) return st;
  for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) {
    const std::string k = muon_group_key(muon_part::matrices, g) + "hparams.";
    muon::args a = opt.matrix_hparams(g);
    st = read_hparams<muon>(saved, dir, k, a);
    if (st.ok()) st = parse_adjust_lr(saved, dir, k + "adjust_lr", a.adjust_lr);
    if (!st.ok()) return st;
    if (o.restore_hparams && !(st = check_hparams<muon>(a, dir, "matrix group " + std::to_string(g))).ok()) return st;
    out.matrix_hparams.push_back(a);
  }
  for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) {
    adamw::args a = opt.aux_hparams(g);
    if (!(st = read_hparams<adamw>(saved, dir, muon_group_key(muon_part::aux, g) + "hparams.", a)).ok()) return st;
    if (o.restore_hparams &&
        !(st = check_hparams<adamw>(a, dir, "aux group " + std::to_string(g), opt.num_states(muon_part::aux, g))).ok())
      return st;
    out.aux_hparams.push_back(a);
  }

  // The tensors this rank holds, from the files that hold them (their saving owners').
  constexpr bool kahan = std::is_same_v<typename Prec::master_rounding, kahan_summation>;
  file_cache files(ix, o.verify_checksums);
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const muon_tensor& x = tensors[k];
    out.master.emplace_back();
    out.compensation.emplace_back();
    out.states.emplace_back();
    if (!opt.holds(x.part, x.group, x.tensor)) continue;
    const std::size_t n = opt.tensor_size(x.part, x.group, x.tensor);
    const int ns = opt.num_states(x.part, x.group);
    out.master.back().resize(n);
    if (kahan) out.compensation.back().resize(n);  // zero unless the checkpoint has one
    out.states.back().assign(std::size_t(ns), std::vector<typename muon_optimizer<Prec, Scaler, Gemm>::state_t>(n));
    for (std::size_t q = 0; q < ix.files.size(); ++q) {
      const zero::range r = ix.files[q].ranges[k];
      if (r.empty()) continue;
      const shard_reader* f = nullptr;
      if (!(st = files.get(q, f)).ok()) return st;
      st = read_master<kahan>(*f, ix, k, r, r, out.master.back().data() + r.begin,
                              kahan ? out.compensation.back().data() + r.begin : nullptr, o.convert_dtypes);
      for (int j = 0; st.ok() && j < ns; ++j)
        st = f->read(state_tensor(k, muon_state_names(x.part)[j]), r, r,
                     out.states.back()[std::size_t(j)].data() + r.begin, o.convert_dtypes);
      if (!st.ok()) return st;
    }
  }
  return status::success();
}

}  // namespace detail

// Restores `opt` from directory `dir`, written by save() at any world size and ZeRO stage. Collective. The
// optimizer must have the same scaler kind, matrix shapes, aux tensor sizes and state counts, master/state dtypes
// and master rounding (load_options relaxes the last two); a mismatch, a missing index or a missing, truncated or
// corrupt file throws mpopt::error on every rank, naming the key or file and both values, and leaves the optimizer
// unchanged.
template <class Prec, class Scaler, class Gemm>
void load(muon_optimizer<Prec, Scaler, Gemm>& opt, const std::string& dir, const load_options& options = {}) {
  detail::muon_staged<muon_optimizer<Prec, Scaler, Gemm>> s;
  detail::agree(opt.communicator(), detail::status_of([&] { return detail::stage_muon_load(opt, dir, options, s); }),
                "checkpoint load");
  // Commit: nothing below can fail (sizes and values were checked above).
  if (options.restore_hparams) {
    for (std::size_t g = 0; g < opt.num_matrix_groups(); ++g) opt.set_matrix_hparams(g, s.matrix_hparams[g]);
    for (std::size_t g = 0; g < opt.num_aux_groups(); ++g) opt.set_aux_hparams(g, s.aux_hparams[g]);
  }
  opt.set_step_count(s.step);
  opt.set_scaler_state(s.scaler);
  const std::vector<detail::muon_tensor> tensors = detail::muon_tensors(opt);
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const detail::muon_tensor& x = tensors[k];
    if (!opt.holds(x.part, x.group, x.tensor)) continue;
    opt.set_local_master(x.part, x.group, x.tensor, s.master[k].data(), s.master[k].size());
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
      opt.set_local_compensation(x.part, x.group, x.tensor, s.compensation[k].data(), s.compensation[k].size());
    for (int j = 0; j < opt.num_states(x.part, x.group); ++j)
      opt.set_state(x.part, x.group, x.tensor, j, s.states[k][std::size_t(j)].data(), s.master[k].size());
  }
  opt.publish_params();
}

}  // namespace mpopt::checkpoint
