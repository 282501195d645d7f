// mpopt::muon_optimizer: Muon for matrices with an auxiliary AdamW for everything else, in one step() (DeepSpeed's
// MuonWithAuxAdam, with torch.optim.Muon's update), on the host backend, optionally sharded with ZeRO 0-2.
//
// The step is mpopt::optimizer's: grad reduction across ranks, grad statistics over every param (matrices and aux),
// one detail::plan_step (overflow skip, the scaler, unscale + clip), then the updates: per matrix the momentum, the
// Newton–Schulz orthogonalisation (host/newton_schulz.hpp, GEMM operands of Gemm's type) and the decayed update; per
// aux tensor mpopt::adamw through host::update_elementwise, bit for bit what mpopt::optimizer<adamw> does.
//
// Usage:
//   mpopt::muon_group<prec> hidden{params, grads, {{4096, 4096}, {4096, 11008}}, muon_args};
//   mpopt::param_group<mpopt::adamw, prec> rest{other_params, other_grads, n, {n_bias, n_gain}, adamw_args};
//   mpopt::muon_optimizer<prec> opt({hidden}, {rest});
//   mpopt::step_result r = opt.step();
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "error.hpp"
#include "host/aligned_buffer.hpp"
#include "host/executor.hpp"
#include "host/newton_schulz.hpp"
#include "numeric/accumulate.hpp"
#include "numeric/convert.hpp"
#include "numeric/traits.hpp"
#include "optimizer.hpp"
#include "policy/precision.hpp"
#include "rule/adam.hpp"
#include "rule/muon.hpp"
#include "scaler/scalers.hpp"

namespace mpopt {

struct matrix_shape {
  std::size_t rows = 0, cols = 0;
};

// Caller-owned buffers of Muon's matrices: `shapes` splits the flat params and grads into row-major matrices, in order.
template <class Prec>
struct muon_group {
  typename Prec::param_t* params = nullptr;
  const typename Prec::grad_t* grads = nullptr;
  std::vector<matrix_shape> shapes;
  muon::args hparams{};

  std::size_t size() const noexcept {
    std::size_t n = 0;
    for (const matrix_shape& s : shapes) n += s.rows * s.cols;
    return n;
  }
};

namespace detail {

// The checks every backend makes of a matrix group, with the messages the tests pin.
template <class Prec>
status validate_muon_group(const muon_group<Prec>& spec, std::size_t g, bool grads_required = true) {
  const std::string where = "matrix group " + std::to_string(g) + ": ";
  for (std::size_t t = 0; t < spec.shapes.size(); ++t) {
    const matrix_shape& s = spec.shapes[t];
    if (s.rows == 0 || s.cols == 0)
      return status::invalid(where + "matrix " + std::to_string(t) + " has shape " + std::to_string(s.rows) + " x " +
                             std::to_string(s.cols) + "; Muon needs rows and cols >= 1");
  }
  const std::size_t n = spec.size();
  if (n > 0 && spec.params == nullptr)
    return status::invalid(where + "params is null but the matrices hold " + std::to_string(n) + " elements");
  if (grads_required && n > 0 && spec.grads == nullptr)
    return status::invalid(where + "grads is null but the matrices hold " + std::to_string(n) + " elements");
  status s = muon::validate(spec.hparams);
  if (!s.ok()) s.message = where + s.message;
  return s;
}

// The aux groups' checks: mpopt::optimizer's, the group named "aux group g".
template <class Prec>
status validate_aux_group(const param_group<adamw, Prec>& spec, std::size_t g, bool grads_required = true) {
  status s = validate_group(spec, g, grads_required);
  if (!s.ok()) s.message = "aux " + s.message;
  return s;
}

}  // namespace detail

// Which of the optimizer's two kinds of groups an index refers to.
enum class muon_part : std::uint8_t { matrices, aux };

// The Philox tag (group_rounding_key) of group g of a part: aux groups take 0, 1, ... as mpopt::optimizer's groups
// do, matrix groups g | 2^15, so no two groups share a key. Both backends use it.
inline std::uint64_t muon_rounding_tag(muon_part part, std::size_t g) {
  return part == muon_part::aux ? std::uint64_t(g) : (std::uint64_t(g) | (std::uint64_t(1) << 15));
}

namespace detail {

// One tensor of a Muon optimizer: a matrix of a matrix group or a tensor of an aux group, and its place under ZeRO.
struct muon_tensor {
  muon_part part = muon_part::matrices;
  std::size_t group = 0, tensor = 0;
  std::size_t offset = 0;  // in its group
  std::size_t size = 0;
  std::size_t rows = 0, cols = 0;  // matrices
  int owner = 0;                   // the rank that holds (stages 1-2) and updates it
  std::size_t exchange = 0;        // offset in the owner-ordered layout the collectives use
};

// The checks both backends' Muon optimizers make, with one set of messages.
inline const char* muon_part_name(muon_part p) {
  return p == muon_part::matrices ? "matrix" : "aux";
}
inline void check_muon_group(muon_part part, std::size_t g, std::size_t groups) {
  if (g >= groups)
    throw error(status::invalid(std::string(muon_part_name(part)) + " group index " + std::to_string(g) +
                                " out of range (" + std::to_string(groups) + " groups)"));
}
inline void check_muon_state_index(muon_part part, std::size_t g, int j, int states, const char* what) {
  if (j < 0 || j >= states)
    throw error(status::invalid(std::string(what) + ": state index " + std::to_string(j) + " out of range for " +
                                muon_part_name(part) + " group " + std::to_string(g) + " (" + std::to_string(states) +
                                " states)"));
}
inline void check_muon_tensor(muon_part part, std::size_t g, std::size_t t, std::size_t tensors, const char* what) {
  if (t >= tensors)
    throw error(status::invalid(std::string(what) + ": tensor " + std::to_string(t) + " out of range for " +
                                muon_part_name(part) + " group " + std::to_string(g) + " (" + std::to_string(tensors) +
                                " tensors)"));
}
inline void check_muon_tensor_range(muon_part part, std::size_t g, std::size_t first, std::size_t last,
                                    std::size_t tensors, const char* what) {
  if (first > last || last > tensors)
    throw error(status::invalid(std::string(what) + ": tensors [" + std::to_string(first) + ", " +
                                std::to_string(last) + ") out of range for " + muon_part_name(part) + " group " +
                                std::to_string(g) + " (" + std::to_string(tensors) + " tensors)"));
}
inline void check_muon_held(const muon_tensor& it, bool held, int rank, const char* what) {
  if (!held)
    throw error(status::invalid(std::string(what) + ": " + muon_part_name(it.part) + " group " +
                                std::to_string(it.group) + " tensor " + std::to_string(it.tensor) +
                                " is held by rank " + std::to_string(it.owner) + ", not by rank " +
                                std::to_string(rank)));
}
inline void check_muon_stage_for_reduce_grads(int stage) {
  if (stage != 2)
    throw error(status::invalid("reduce_grads: ZeRO stage " + std::to_string(stage) +
                                " reduces the groups' grads in step(); reduce_grads is for stage 2"));
}
inline error muon_missing_grads(muon_part part, std::size_t g) {
  return error(status::invalid("step: " + std::string(muon_part_name(part)) + " group " + std::to_string(g) +
                               " has no grads: call reduce_grads() or set its grads"));
}
// Whether two sets of Muon hyper-parameters run the same Newton–Schulz iteration (steps and coefficients): what the
// CUDA optimizer's GEMM batches fix at construction.
inline bool same_newton_schulz(const muon::args& a, const muon::args& b) {
  return a.ns_steps == b.ns_steps && a.ns_coefficients.a == b.ns_coefficients.a &&
         a.ns_coefficients.b == b.ns_coefficients.b && a.ns_coefficients.c == b.ns_coefficients.c;
}
inline constexpr const char* muon_stage3_refused =
    "ZeRO stage 3 is not supported (Newton-Schulz needs whole matrices and stage 3 shards params); use "
    "zero_options.stage 0, 1 or 2";

// The tensors of a Muon optimizer, matrix groups' matrices then aux groups' tensors (T: muon_tensor or a backend's
// record derived from it), with their owners and the owner-ordered layout (rank 0's tensors in order, then rank
// 1's, ...) that the grad and param collectives use. Owners are assigned greedily, largest first to the least loaded
// rank (the lowest on ties), matrices by Newton–Schulz work rows·cols·min(rows, cols) and aux tensors by elements
// apart: from the layout alone, so every rank and both backends agree.
template <class T>
struct muon_layout {
  std::vector<T> tensors;
  std::vector<std::size_t> matrix_first, aux_first;  // per group: its first tensor, and the end
  std::vector<std::size_t> exchange_begin;           // per rank: its first element in the layout, and the end
  std::vector<std::size_t> exchange_order;           // tensors in layout order

  muon_layout() = default;
  template <class Prec>
  muon_layout(const std::vector<muon_group<Prec>>& matrices, const std::vector<param_group<adamw, Prec>>& aux,
              int world) {
    matrix_first.push_back(0);
    for (std::size_t g = 0; g < matrices.size(); ++g) {
      std::size_t offset = 0;
      for (std::size_t t = 0; t < matrices[g].shapes.size(); ++t) {
        T it;
        it.part = muon_part::matrices;
        it.group = g;
        it.tensor = t;
        it.offset = offset;
        it.rows = matrices[g].shapes[t].rows;
        it.cols = matrices[g].shapes[t].cols;
        it.size = it.rows * it.cols;
        offset += it.size;
        tensors.push_back(it);
      }
      matrix_first.push_back(tensors.size());
    }
    aux_first.push_back(tensors.size());
    for (std::size_t g = 0; g < aux.size(); ++g) {
      const std::vector<std::size_t> offsets = tensor_offsets(aux[g]);
      for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
        T it;
        it.part = muon_part::aux;
        it.group = g;
        it.tensor = t;
        it.offset = offsets[t];
        it.size = offsets[t + 1] - offsets[t];
        tensors.push_back(it);
      }
      aux_first.push_back(tensors.size());
    }
    assign_owners(world);
  }

  std::size_t first(muon_part part, std::size_t g) const {
    return (part == muon_part::matrices ? matrix_first : aux_first)[g];
  }
  std::size_t count(muon_part part, std::size_t g) const { return first(part, g + 1) - first(part, g); }

  // f(piece) for pieces of the layout of at most `bucket` elements; counts[r] is rank r's share of the piece.
  template <class F>
  void for_each_piece(std::size_t bucket, std::vector<std::size_t>& counts, F&& f) const {
    const std::size_t total = exchange_begin.back();
    counts.resize(exchange_begin.size() - 1);
    for (std::size_t b = 0; b < total; b += bucket) {
      const zero::range piece{b, std::min(total, b + bucket)};
      for (std::size_t r = 0; r < counts.size(); ++r)
        counts[r] = zero::intersect(piece, zero::range{exchange_begin[r], exchange_begin[r + 1]}).size();
      f(piece);
    }
  }

  // f(tensor, first, count, at): elements [first, first + count) of `tensor` lie at piece offset `at`.
  template <class F>
  void for_each_overlap(zero::range piece, F&& f) const {
    for (std::size_t i : exchange_order) {
      const T& it = tensors[i];
      const zero::range o = zero::intersect(piece, zero::range{it.exchange, it.exchange + it.size});
      if (!o.empty()) f(it, o.begin - it.exchange, o.size(), o.begin - piece.begin);
    }
  }

 private:
  void assign_owners(int world) {
    auto assign = [&](muon_part part, auto cost) {
      std::vector<std::size_t> order;
      for (std::size_t i = 0; i < tensors.size(); ++i)
        if (tensors[i].part == part) order.push_back(i);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::size_t a, std::size_t b) { return cost(tensors[a]) > cost(tensors[b]); });
      std::vector<double> load(std::size_t(world), 0.0);
      for (std::size_t i : order) {
        const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
        tensors[i].owner = r;
        load[std::size_t(r)] += cost(tensors[i]);
      }
    };
    assign(muon_part::matrices,
           [](const T& it) { return double(it.rows) * double(it.cols) * double(std::min(it.rows, it.cols)); });
    assign(muon_part::aux, [](const T& it) { return double(it.size); });
    exchange_begin.assign(std::size_t(world) + 1, 0);
    for (const T& it : tensors) exchange_begin[std::size_t(it.owner) + 1] += it.size;
    for (int r = 0; r < world; ++r) exchange_begin[std::size_t(r) + 1] += exchange_begin[std::size_t(r)];
    std::vector<std::size_t> next(exchange_begin.begin(), exchange_begin.end() - 1);
    for (T& it : tensors) {
      it.exchange = next[std::size_t(it.owner)];
      next[std::size_t(it.owner)] += it.size;
    }
    exchange_order.resize(tensors.size());
    std::iota(exchange_order.begin(), exchange_order.end(), std::size_t(0));
    std::stable_sort(exchange_order.begin(), exchange_order.end(),
                     [&](std::size_t a, std::size_t b) { return tensors[a].exchange < tensors[b].exchange; });
  }
};

// The words every rank max-reduces to check that all built the same Muon layout (check_layout_words).
template <class Prec>
void muon_layout_words(int stage, const std::vector<muon_group<Prec>>& matrices,
                       const std::vector<param_group<adamw, Prec>>& aux, double (&v)[4]) {
  layout_hash h;
  h.mix(std::uint64_t(stage));
  h.mix(matrices.size());
  for (const muon_group<Prec>& spec : matrices) {
    h.mix(spec.shapes.size());
    for (const matrix_shape& s : spec.shapes) {
      h.mix(s.rows);
      h.mix(s.cols);
    }
  }
  h.mix(aux.size());
  for (const param_group<adamw, Prec>& spec : aux) {
    h.mix(spec.size);
    h.mix(spec.tensor_sizes.size());
    for (std::size_t n : spec.tensor_sizes) h.mix(n);
    h.mix(std::uint64_t(adamw::num_states(spec.hparams)));
  }
  h.words(v);
}

inline constexpr const char* muon_layout_what =
    "the muon_optimizer layout (groups, matrix shapes, aux tensor_sizes, amsgrad or zero_options.stage)";

}  // namespace detail

// ZeRO keeps every matrix whole: Newton–Schulz needs all of it. Each tensor (matrix or aux tensor) has an owner rank,
// assigned greedily (largest first, to the least loaded rank; matrices by Newton–Schulz work, rows·cols·min(rows,
// cols), aux tensors by elements), deterministically from the layout alone.
//   stage 0  every rank holds and updates everything. Grads are reduced to their owners and the means all-gathered,
//            so every replica holds the same bits.
//   stage 1  the owner holds a tensor's master and states and updates it; step() reduces the caller's full grads to
//            the owners (reduce-scatter in owner order) and all-gathers the updated params into every rank's params.
//   stage 2  as 1, and grads are sharded: reduce_grads() reduces (and accumulates) tensors to their owners as soon as
//            their grads exist, after which the caller may drop them; step() reduces the param groups' grads only
//            when reduce_grads() was not called since the last step.
//   stage 3  refused: params would have to be gathered per matrix for the orthogonalisation as well as for the
//            forward pass; use stage 2.
// Grad statistics are per tensor, summed in double in host::reduce_block blocks, all-reduced (each tensor has one
// contributor, so the sum is exact) and added in tensor order: every stage and world size clips and skips alike, and
// with the reduction in a type wide enough that the mean of W equal grads is exact (optimizer.hpp), a sharded run
// reproduces the single-rank one bit for bit.
template <class Prec, class Scaler = no_scaler, class Gemm = muon_gemm<float>>
class muon_optimizer {
  static_assert(is_precision<Prec>::value,
                "mpopt::muon_optimizer: the 1st argument must be an mpopt::precision<param<..>, master<..>, grad<..>, "
                "state<..>>");
  static_assert(std::is_same_v<typename Prec::compute_t, float>,
                "mpopt::muon_optimizer: the compute type must be float (the Newton-Schulz GEMMs accumulate in fp32)");
  static_assert(std::is_same_v<Gemm, muon_gemm<float>> || std::is_same_v<Gemm, muon_gemm<bf16_t>>,
                "mpopt::muon_optimizer: the 3rd argument must be muon_gemm<float> or muon_gemm<bf16_t>");

 public:
  using precision_type = Prec;
  using scaler_type = Scaler;
  using scaler_args = typename Scaler::args;
  using scaler_state_type = typename Scaler::state_type;
  using param_t = typename Prec::param_t;
  using master_t = typename Prec::master_t;
  using grad_t = typename Prec::grad_t;
  using state_t = typename Prec::state_t;
  using compute_t = typename Prec::compute_t;
  using gemm_t = typename Gemm::type;
  using matrix_group_type = muon_group<Prec>;
  using aux_group_type = param_group<adamw, Prec>;

  // One rank. Throws mpopt::error naming the group, matrix and field when a buffer, shape or hyper-parameter is bad.
  explicit muon_optimizer(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux = {},
                          scaler_args scaler = {}, step_options options = {})
      : muon_optimizer(std::move(matrices), std::move(aux), own_single_rank(), zero_options{}, scaler, options) {}

  // ZeRO over `comm` (host memory; it must outlive the optimizer). Collective: every rank constructs with the same
  // layout (checked) and its own buffers.
  muon_optimizer(std::vector<matrix_group_type> matrices, std::vector<aux_group_type> aux, comm::communicator& comm,
                 zero_options zero, scaler_args scaler = {}, step_options options = {})
      : comm_(&comm), zero_(zero), scaler_args_(scaler), options_(options) {
    if (comm.memory() != comm::memory_space::host)
      throw error(
          status::invalid("muon_optimizer needs a host-memory communicator (mpi or single-rank), got " + comm.name()));
    throw_if_error(Scaler::validate(scaler_args_));
    throw_if_error(detail::validate_step_options(options_));
    throw_if_error(detail::validate_zero_options(zero_));
    if (zero_.stage == 3)
      throw error(status{errc::unsupported, std::string("muon_optimizer: ") + detail::muon_stage3_refused});
    for (std::size_t g = 0; g < matrices.size(); ++g)
      throw_if_error(detail::validate_muon_group(matrices[g], g, zero_.stage < 2));
    for (std::size_t g = 0; g < aux.size(); ++g) throw_if_error(detail::validate_aux_group(aux[g], g, zero_.stage < 2));
    rank_ = comm.rank();
    world_ = comm.size();
    matrices_ = std::move(matrices);
    aux_ = std::move(aux);
    check_same_layout();
    scaler_state_ = Scaler::init(scaler_args_);
    layout_ = detail::muon_layout<item>(matrices_, aux_, world_);
    allocate();
  }

  std::size_t num_matrix_groups() const noexcept { return matrices_.size(); }
  std::size_t num_aux_groups() const noexcept { return aux_.size(); }
  const muon::args& matrix_hparams(std::size_t g) const { return matrices_.at(g).hparams; }
  const adamw::args& aux_hparams(std::size_t g) const { return aux_.at(g).hparams; }
  // Both validate before changing anything (e.g. an lr schedule) and throw mpopt::error naming the field.
  void set_matrix_hparams(std::size_t g, const muon::args& a) {
    check_group(muon_part::matrices, g);
    throw_if_error(prefixed(muon::validate(a), "matrix group " + std::to_string(g) + ": "));
    matrices_[g].hparams = a;
  }
  void set_aux_hparams(std::size_t g, const adamw::args& a) {
    check_group(muon_part::aux, g);
    throw_if_error(prefixed(adamw::validate(a), "aux group " + std::to_string(g) + ": "));
    if (adamw::num_states(a) != adamw::num_states(aux_[g].hparams))
      throw error(status::invalid("aux group " + std::to_string(g) +
                                  ": changing the number of optimizer states (amsgrad on/off) after construction is "
                                  "not supported"));
    aux_[g].hparams = a;
  }

  const step_options& options() const noexcept { return options_; }
  void set_options(const step_options& o) {
    throw_if_error(detail::validate_step_options(o));
    options_ = o;
  }
  const zero_options& zero() const noexcept { return zero_; }
  std::int64_t step_count() const noexcept { return step_; }
  double loss_scale() const { return double(Scaler::scale(scaler_state_, scaler_args_)); }
  const scaler_state_type& scaler_state() const noexcept { return scaler_state_; }
  void set_scaler_state(const scaler_state_type& s) { scaler_state_ = s; }

  // The rank that holds (stages 1-2) and updates tensor t of group g.
  int owner(muon_part part, std::size_t g, std::size_t t) const {
    return layout_.tensors[item_index(part, g, t, "owner")].owner;
  }

  // Full copies of group g's master weights, or of its state j (matrices: 0, the momentum buffer; aux: AdamW's
  // exp_avg, exp_avg_sq and, with amsgrad, max_exp_avg_sq), into out[0, group size). Collective at stages 1-2.
  void gather_master(muon_part part, std::size_t g, master_t* out) {
    check_group(part, g);
    for_each_tensor(part, g, [&](const item& it) { gather_item(it, master_of(it), out + it.offset); });
  }
  void gather_state(muon_part part, std::size_t g, int j, state_t* out) {
    check_state_index(part, g, j, "gather_state");
    for_each_tensor(part, g, [&](const item& it) { gather_item(it, state_of(it, j), out + it.offset); });
  }
  // kahan_summation: the same for group g's compensation (what rounding dropped from each master element).
  void gather_compensation(muon_part part, std::size_t g, master_t* out) {
    check_group(part, g);
    require_kahan("gather_compensation");
    for_each_tensor(part, g,
                    [&](const item& it) { gather_item(it, compensation_.data() + it.local, out + it.offset); });
  }

  // Checkpoints (checkpoint/muon.hpp). Group g's tensors: its matrices, or its aux tensors (one when the group has
  // no tensor_sizes); its states: 1 for matrices, AdamW's count for aux groups.
  comm::communicator& communicator() const noexcept { return *comm_; }
  const scaler_args& scaler_arguments() const noexcept { return scaler_args_; }
  void set_step_count(std::int64_t step) {
    if (step < 0) throw error(status::invalid("set_step_count: step must be >= 0, got " + std::to_string(step)));
    step_ = step;
  }
  const std::vector<matrix_shape>& matrix_shapes(std::size_t g) const { return matrices_.at(g).shapes; }
  std::size_t num_tensors(muon_part part, std::size_t g) const {
    check_group(part, g);
    const std::vector<std::size_t>& first = part == muon_part::matrices ? layout_.matrix_first : layout_.aux_first;
    return first[g + 1] - first[g];
  }
  std::size_t tensor_size(muon_part part, std::size_t g, std::size_t t) const {
    return layout_.tensors[item_index(part, g, t, "tensor_size")].size;
  }
  int num_states(muon_part part, std::size_t g) const {
    check_group(part, g);
    return part == muon_part::matrices ? muon::max_states : adamw::num_states(aux_[g].hparams);
  }
  // Whether this rank holds tensor t's master and states: its owner, or every rank at stage 0 or on one rank. Then
  // master() and state() point at its tensor_size() elements; otherwise they throw.
  bool holds(muon_part part, std::size_t g, std::size_t t) const {
    return layout_.tensors[item_index(part, g, t, "holds")].held;
  }
  // (master_of and state_of only form pointers; they are non-const for step()'s writes.)
  const master_t* master(muon_part part, std::size_t g, std::size_t t) const {
    return const_cast<muon_optimizer*>(this)->master_of(held_item(part, g, t, "master"));
  }
  const state_t* state(muon_part part, std::size_t g, std::size_t t, int j) const {
    check_state_index(part, g, j, "state");
    return const_cast<muon_optimizer*>(this)->state_of(held_item(part, g, t, "state"), j);
  }
  // kahan_summation: a held tensor's compensation, tensor_size() elements; null with another master rounding.
  const master_t* compensation(muon_part part, std::size_t g, std::size_t t) const {
    const item& it = held_item(part, g, t, "compensation");
    return compensation_.size() > 0 ? compensation_.data() + it.local : nullptr;
  }
  // Restore a held tensor from `values` (n = its size). set_local_master also rewrites this rank's param copy of it;
  // publish_params() then copies every owner's params into the other ranks' (collective at stages 1-2; a no-op
  // otherwise), as step() does.
  void set_local_master(muon_part part, std::size_t g, std::size_t t, const master_t* values, std::size_t n) {
    const item& it = held_item(part, g, t, "set_local_master");
    check_tensor_size(it, n, "set_local_master");
    master_t* m = master_of(it);
    param_t* p = params_of(it);
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = values[i];
      if constexpr (Prec::separate_master) p[i] = convert<param_t>(values[i]);
    }
  }
  void set_state(muon_part part, std::size_t g, std::size_t t, int j, const state_t* values, std::size_t n) {
    check_state_index(part, g, j, "set_state");
    const item& it = held_item(part, g, t, "set_state");
    check_tensor_size(it, n, "set_state");
    std::copy(values, values + n, state_of(it, j));
  }
  // kahan_summation: restores a held tensor's compensation (n = its size). Not collective.
  void set_local_compensation(muon_part part, std::size_t g, std::size_t t, const master_t* values, std::size_t n) {
    const item& it = held_item(part, g, t, "set_local_compensation");
    check_tensor_size(it, n, "set_local_compensation");
    require_kahan("set_local_compensation");
    std::copy(values, values + n, compensation_.data() + it.local);
  }

  // Stages 1-2: every owner's params into every rank's params (collective).
  void publish_params() {
    if (!sharded()) return;
    for_each_piece([&](zero::range piece) {
      for_each_overlap(piece, [&](const item& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner != rank_) return;
        const param_t* p = params_of(it) + first;
        std::copy(p, p + count, param_stage_.data() + at);
      });
      comm_->all_gather(param_stage_.data(), counts_);
      for_each_overlap(piece, [&](const item& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner == rank_) return;
        std::copy(param_stage_.data() + at, param_stage_.data() + at + count, params_of(it) + first);
      });
    });
  }

  // Stage 2: reduces (mean over ranks) the grads of tensors [first, last) of group g, `grads` holding their elements
  // contiguously, to their owners, adding them to what was reduced since the last step. Collective; afterwards the
  // caller may reuse `grads`.
  // G may differ from grad_t: micro-batch grads in the model's dtype accumulate in the grad role's dtype
  // (grad_accumulation.hpp).
  template <class G>
  void reduce_grads(muon_part part, std::size_t g, std::size_t first, std::size_t last, const G* grads) {
    static_assert(is_element_type_v<G>,
                  "mpopt::muon_optimizer::reduce_grads: grads must point to float, double, half_t or bf16_t");
    detail::check_muon_stage_for_reduce_grads(zero_.stage);
    detail::check_muon_tensor_range(part, g, first, last, num_tensors(part, g), "reduce_grads");
    if (first == last) return;
    const std::size_t base = layout_.tensors[item_index(part, g, first, "reduce_grads")].offset;
    for (std::size_t t = first; t < last; ++t) {
      const item& it = layout_.tensors[item_index(part, g, t, "reduce_grads")];
      if (it.size > 0 && grads == nullptr) throw error(status::invalid("reduce_grads: grads is null"));
      reduce_to_owner(it, grads + (it.offset - base));
    }
    has_reduced_ = true;
  }

  // Bytes this rank holds, by role (as mpopt::optimizer::memory; workspace includes the Newton–Schulz buffers).
  memory_report memory() const {
    memory_report m;
    m.params = total_elements_ * sizeof(param_t);
    if (zero_.stage >= 2) {
      m.grads = reduced_.size() * sizeof(grad_t);
    } else {
      m.grads = total_elements_ * sizeof(grad_t);
      m.workspace += reduced_.size() * sizeof(grad_t);
    }
    m.master = (master_copy_.size() + compensation_.size()) * sizeof(master_t);
    m.states = momentum_.size() * sizeof(state_t);
    for (const auto& s : adam_states_) m.states += s.size() * sizeof(state_t);
    m.workspace += ns_.bytes() + u_.size() * sizeof(float) + (send_.size() + recv_.size()) * sizeof(reduce_type) +
                   grad_stage_.size() * sizeof(grad_t) + param_stage_.size() * sizeof(param_t) +
                   (item_sq_.size() + partials_.size()) * sizeof(double);
    return m;
  }

  // Multiply-adds of the Newton–Schulz GEMMs this rank runs per applied step (for throughput figures).
  double ns_multiply_adds_per_step() const {
    double total = 0;
    for (const item& it : layout_.tensors)
      if (it.part == muon_part::matrices && it.held)
        total += double(matrices_[it.group].hparams.ns_steps) * host::ns_multiply_adds(it.rows, it.cols);
    return total;
  }

  step_result step() {
    const bool need_stats = Scaler::skips_on_overflow(scaler_args_) || options_.max_grad_norm > 0;
    if (!has_reduced_) {
      exchange_grads();
      // Stage 2 accumulates into `reduced_`: what the exchange wrote there is consumed (zeroed) after this step.
      has_reduced_ = zero_.stage >= 2 && world_ > 1;
    }
    double sum_sq = 0.0;
    if (need_stats) {
      for (std::size_t i = 0; i < layout_.tensors.size(); ++i) {
        const item& it = layout_.tensors[i];
        item_sq_[i] = 0.0;
        if (!it.held) continue;  // sharded: another rank's; its owner contributes the sum
        host::reduce_grad_partials(grads_of(it), it.size, partials_.data());
        item_sq_[i] = host::sum_in_order(partials_.data(), (it.size + host::reduce_block - 1) / host::reduce_block);
      }
      if (sharded()) comm_->all_reduce(item_sq_.data(), item_sq_.size(), comm::reduce_op::sum);
      sum_sq = host::sum_in_order(item_sq_.data(), item_sq_.size());
    }
    detail::step_plan plan = detail::plan_step<Scaler>(scaler_state_, scaler_args_, options_, need_stats, sum_sq,
                                                       !std::isfinite(sum_sq), step_);
    if (plan.result.applied) {
      ++step_;
      const compute_t factor = compute_t(plan.factor.factor);
      for (const item& it : layout_.tensors) {
        if (!it.held) continue;
        if (it.part == muon_part::matrices) {
          update_matrix(it, factor);
        } else {
          update_aux(it, factor);
        }
      }
      publish_params();
    }
    consume_grads();  // applied or skipped, this step's grads are spent
    return plan.result;
  }

 private:
  using reduce_type = detail::reduce_t<grad_t>;

  // One tensor (detail::muon_tensor) and where this rank keeps it.
  struct item : detail::muon_tensor {
    bool held = false;              // this rank holds its master and states, and updates it
    std::size_t local = 0;          // offset in the held buffers (reduced grads, master, compensation)
    std::size_t state_local = 0;    // offset in momentum_ (matrices) or adam_states_[0, 1] (aux)
    std::size_t amsgrad_local = 0;  // aux with amsgrad: offset in adam_states_[2]
  };

  static comm::communicator& own_single_rank() {
    static comm::single_rank one;
    return one;
  }

  static status prefixed(status s, const std::string& prefix) {
    if (!s.ok()) s.message = prefix + s.message;
    return s;
  }

  bool sharded() const noexcept { return zero_.stage >= 1 && world_ > 1; }

  void check_group(muon_part part, std::size_t g) const {
    detail::check_muon_group(part, g, part == muon_part::matrices ? matrices_.size() : aux_.size());
  }

  void check_state_index(muon_part part, std::size_t g, int j, const char* what) const {
    detail::check_muon_state_index(part, g, j, num_states(part, g), what);
  }

  static void require_kahan(const char* what) {
    if constexpr (!std::is_same_v<typename Prec::master_rounding, kahan_summation>)
      throw error(status::invalid(std::string(what) +
                                  ": only a master<T, kahan_summation> keeps a compensation buffer, this optimizer's "
                                  "master rounds by another rule"));
  }

  const item& held_item(muon_part part, std::size_t g, std::size_t t, const char* what) const {
    const item& it = layout_.tensors[item_index(part, g, t, what)];
    detail::check_muon_held(it, it.held, rank_, what);
    return it;
  }

  static void check_tensor_size(const item& it, std::size_t n, const char* what) {
    if (n != it.size)
      throw error(status::invalid(std::string(what) + ": " + detail::muon_part_name(it.part) + " group " +
                                  std::to_string(it.group) + " tensor " + std::to_string(it.tensor) + " has " +
                                  std::to_string(it.size) + " elements, got n = " + std::to_string(n)));
  }

  std::size_t item_index(muon_part part, std::size_t g, std::size_t t, const char* what) const {
    detail::check_muon_tensor(part, g, t, num_tensors(part, g), what);
    return (part == muon_part::matrices ? layout_.matrix_first : layout_.aux_first)[g] + t;
  }

  template <class F>
  void for_each_tensor(muon_part part, std::size_t g, F&& f) const {
    const std::vector<std::size_t>& first = part == muon_part::matrices ? layout_.matrix_first : layout_.aux_first;
    for (std::size_t i = first[g]; i < first[g + 1]; ++i) f(layout_.tensors[i]);
  }

  // Every rank must have the same layout; a mismatch would hang or corrupt the collectives.
  void check_same_layout() {
    if (world_ == 1) return;
    double v[4];
    detail::muon_layout_words(zero_.stage, matrices_, aux_, v);
    comm_->all_reduce(v, 4, comm::reduce_op::max);
    detail::check_layout_words(v, detail::muon_layout_what);
  }

  void allocate() {
    std::size_t held = 0, held_matrix = 0, held_aux = 0, held_amsgrad = 0, largest = 0, largest_matrix = 0;
    std::vector<matrix_shape> held_shapes;
    for (item& it : layout_.tensors) {
      total_elements_ += it.size;
      it.held = zero_.stage == 0 || world_ == 1 || it.owner == rank_;
      if (!it.held) continue;
      it.local = held;
      held += it.size;
      largest = std::max(largest, it.size);
      if (it.part == muon_part::matrices) {
        it.state_local = held_matrix;
        held_matrix += it.size;
        largest_matrix = std::max(largest_matrix, it.size);
        held_shapes.push_back({it.rows, it.cols});
      } else {
        it.state_local = held_aux;
        held_aux += it.size;
        if (aux_[it.group].hparams.amsgrad) {  // only these hold max_exp_avg_sq
          it.amsgrad_local = held_amsgrad;
          held_amsgrad += it.size;
        }
      }
    }
    if (world_ > 1 || zero_.stage >= 2) reduced_ = host::aligned_buffer<grad_t>(held);
    if constexpr (Prec::separate_master) {
      master_copy_ = host::aligned_buffer<master_t>(held);
      for (const item& it : layout_.tensors) {
        if (!it.held) continue;
        const param_t* p = params_of(it);
        for (std::size_t i = 0; i < it.size; ++i) master_copy_[it.local + i] = convert<master_t>(p[i]);
      }
    }
    if constexpr (std::is_same_v<typename Prec::master_rounding, kahan_summation>)
      compensation_ = host::aligned_buffer<master_t>(held);  // zero-initialised
    const state_t zero = convert<state_t>(compute_t(0));     // muon::initial_state and adamw::initial_state
    momentum_ = host::aligned_buffer<state_t>(held_matrix);
    std::fill(momentum_.data(), momentum_.data() + held_matrix, zero);
    for (std::size_t n : {held_aux, held_aux, held_amsgrad}) {
      adam_states_.emplace_back(n);
      std::fill(adam_states_.back().data(), adam_states_.back().data() + n, zero);
    }
    u_ = host::aligned_buffer<float>(largest_matrix);
    ns_ = host::newton_schulz_workspace<gemm_t>::for_shapes(held_shapes.begin(), held_shapes.end());
    item_sq_.resize(layout_.tensors.size());
    partials_.resize((largest + host::reduce_block - 1) / host::reduce_block);
    if (world_ > 1) {
      const std::size_t n = std::min(std::max<std::size_t>(total_elements_, 1), zero_.bucket_elements);
      send_ = host::aligned_buffer<reduce_type>(n);
      recv_ = host::aligned_buffer<reduce_type>(n);
      if (zero_.stage == 0) grad_stage_ = host::aligned_buffer<grad_t>(n);
      if (zero_.stage >= 1) param_stage_ = host::aligned_buffer<param_t>(n);
      counts_.resize(std::size_t(world_));
    }
  }

  param_t* params_of(const item& it) const {
    return (it.part == muon_part::matrices ? matrices_[it.group].params : aux_[it.group].params) + it.offset;
  }
  const grad_t* caller_grads(const item& it) const {
    return (it.part == muon_part::matrices ? matrices_[it.group].grads : aux_[it.group].grads) + it.offset;
  }
  // The grads step() reads: the caller's own when nothing needed reducing.
  const grad_t* grads_of(const item& it) const {
    return world_ > 1 || has_reduced_ ? reduced_.data() + it.local : caller_grads(it);
  }
  master_t* master_of(const item& it) {
    if constexpr (Prec::separate_master) {
      return master_copy_.data() + it.local;
    } else {
      return params_of(it);
    }
  }
  state_t* state_of(const item& it, int j) {
    if (it.part == muon_part::matrices) return momentum_.data() + it.state_local;
    return adam_states_[std::size_t(j)].data() + (j == 2 ? it.amsgrad_local : it.state_local);
  }
  master_store_ctx<master_t> rounding_ctx(const item& it) {
    return make_master_store_ctx(group_rounding_key(options_.rounding_seed, muon_rounding_tag(it.part, it.group)),
                                 std::uint64_t(step_), it.offset,
                                 compensation_.size() > 0 ? compensation_.data() + it.local : nullptr);
  }

  // A tensor's elements from its owner into `out` (the same on every rank afterwards).
  template <class T>
  void gather_item(const item& it, const T* local, T* out) {
    if (it.held) std::copy(local, local + it.size, out);
    if (sharded()) comm_->broadcast(out, it.size, it.owner);
  }

  // Pieces of the owner-ordered layout of at most bucket_elements; counts_ holds each rank's share of the piece.
  template <class F>
  void for_each_piece(F&& f) {
    layout_.for_each_piece(zero_.bucket_elements, counts_, f);
  }
  template <class F>
  void for_each_overlap(zero::range piece, F&& f) const {
    layout_.for_each_overlap(piece, f);
  }

  // World > 1: the mean of every tensor's grads onto its owner (stage 0: then onto every rank).
  void exchange_grads() {
    if (zero_.stage >= 2) {
      for (std::size_t g = 0; g < matrices_.size(); ++g)
        if (matrices_[g].grads == nullptr && matrices_[g].size() > 0)
          throw detail::muon_missing_grads(muon_part::matrices, g);
      for (std::size_t g = 0; g < aux_.size(); ++g)
        if (aux_[g].grads == nullptr && aux_[g].size > 0) throw detail::muon_missing_grads(muon_part::aux, g);
    }
    if (world_ == 1) return;
    const reduce_type world = reduce_type(world_);
    const std::size_t mine = layout_.exchange_begin[std::size_t(rank_)];
    for_each_piece([&](zero::range piece) {
      for_each_overlap(piece, [&](const item& it, std::size_t first, std::size_t count, std::size_t at) {
        const grad_t* g = caller_grads(it) + first;
        for (std::size_t i = 0; i < count; ++i) send_[at + i] = convert<reduce_type>(g[i]);
      });
      comm_->reduce_scatter(send_.data(), recv_.data(), counts_, comm::reduce_op::sum);
      const std::size_t my_first = std::max(piece.begin, mine);  // recv_[0] is layout element my_first
      for_each_overlap(piece, [&](const item& it, std::size_t first, std::size_t count, std::size_t at) {
        if (it.owner != rank_) return;
        grad_t* out = reduced_.data() + it.local + first;
        const reduce_type* in = recv_.data() + (piece.begin + at - my_first);
        for (std::size_t i = 0; i < count; ++i) out[i] = store_mean(out[i], in[i], world, false);
        if (zero_.stage == 0) std::copy(out, out + count, grad_stage_.data() + at);
      });
      if (zero_.stage == 0) {
        comm_->all_gather(grad_stage_.data(), counts_);
        for_each_overlap(piece, [&](const item& it, std::size_t first, std::size_t count, std::size_t at) {
          std::copy(grad_stage_.data() + at, grad_stage_.data() + at + count, reduced_.data() + it.local + first);
        });
      }
    });
  }

  // Stage 2: one tensor's grads, mean over ranks, added to its owner's reduced grads.
  template <class G>
  void reduce_to_owner(const item& it, const G* g) {
    const reduce_type world = reduce_type(world_);
    if (world_ == 1) {
      grad_t* out = reduced_.data() + it.local;
      for (std::size_t i = 0; i < it.size; ++i) out[i] = accumulate_grad(out[i], convert<reduce_type>(g[i]));
      return;
    }
    for (std::size_t b = 0; b < it.size; b += zero_.bucket_elements) {
      const std::size_t n = std::min(zero_.bucket_elements, it.size - b);
      for (std::size_t i = 0; i < n; ++i) send_[i] = convert<reduce_type>(g[b + i]);
      std::fill(counts_.begin(), counts_.end(), std::size_t(0));
      counts_[std::size_t(it.owner)] = n;
      comm_->reduce_scatter(send_.data(), recv_.data(), counts_, comm::reduce_op::sum);
      if (it.owner != rank_) continue;
      grad_t* out = reduced_.data() + it.local + b;
      for (std::size_t i = 0; i < n; ++i) out[i] = store_mean(out[i], recv_[i], world, true);
    }
  }

  void consume_grads() {
    if (has_reduced_) std::fill(reduced_.data(), reduced_.data() + reduced_.size(), grad_t{});
    has_reduced_ = false;
  }

  void update_matrix(const item& it, compute_t factor) {
    using C = compute_t;
    const muon::args& hp = matrices_[it.group].hparams;
    const muon::coeffs<C> k = muon::prepare<C>(hp, step_);
    const grad_t* g = grads_of(it);
    state_t* buf = momentum_.data() + it.state_local;
    float* u = u_.data();
    const std::ptrdiff_t n = std::ptrdiff_t(it.size);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n > host::parallel_threshold)
#endif
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const C gi = convert<C>(g[i]) * factor;
      C b = convert<C>(buf[i]);
      muon::update_buffer(k, gi, b);
      buf[i] = convert<state_t>(b);
      u[i] = muon::ns_input(k, gi, convert<C>(buf[i]));  // from the stored (rounded) buffer
    }
    const host::ns_result<gemm_t> o =
        host::newton_schulz<gemm_t>(u, it.rows, it.cols, hp.ns_coefficients, hp.ns_steps, hp.eps, ns_);
    host::copy_result(o, u);  // u is spent: it now holds the orthogonalised update, in the matrix's order
    const C neg_lr = C(-muon::adjusted_lr(hp, it.rows, it.cols));
    master_t* m = master_of(it);
    param_t* p = params_of(it);
    const master_store_ctx<master_t> ctx = rounding_ctx(it);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n > host::parallel_threshold)
#endif
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const C w_old = convert<C>(m[i]);
      C w = w_old;
      muon::apply_update(k, w, C(u[i]), neg_lr);
      host::detail::store_weight<Prec>(m, p, std::size_t(i), w, w_old, ctx);
    }
  }

  void update_aux(const item& it, compute_t factor) {
    const adamw::args& hp = aux_[it.group].hparams;
    const int ns = adamw::num_states(hp);
    host::group_view<Prec, adamw::max_states> v;
    v.param = params_of(it);
    v.master = master_of(it);
    v.grad = grads_of(it);
    v.n = it.size;
    for (int j = 0; j < ns; ++j) v.states[j] = state_of(it, j);
    v.rounding = rounding_ctx(it);
    host::update_elementwise<adamw, Prec>(v, adamw::prepare<compute_t>(hp, step_), ns, factor);
  }

  comm::communicator* comm_;
  int rank_ = 0, world_ = 1;
  zero_options zero_;
  scaler_args scaler_args_;
  scaler_state_type scaler_state_{};
  step_options options_;
  std::int64_t step_ = 0;
  std::vector<matrix_group_type> matrices_;
  std::vector<aux_group_type> aux_;

  detail::muon_layout<item> layout_;
  std::size_t total_elements_ = 0;

  host::aligned_buffer<grad_t> reduced_;  // the reduced grads of the held tensors (world > 1, or stage 2)
  bool has_reduced_ = false;              // stage 2: `reduced_` holds grads no step has consumed
  host::aligned_buffer<master_t> master_copy_, compensation_;
  host::aligned_buffer<state_t> momentum_;
  std::vector<host::aligned_buffer<state_t>> adam_states_;  // exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad groups)
  // Step workspace, sized at construction so that a step allocates nothing.
  host::aligned_buffer<float> u_;  // the Newton–Schulz input of one matrix
  host::newton_schulz_workspace<gemm_t> ns_;
  std::vector<double> item_sq_, partials_;
  host::aligned_buffer<reduce_type> send_, recv_;
  host::aligned_buffer<grad_t> grad_stage_;
  host::aligned_buffer<param_t> param_stage_;
  std::vector<std::size_t> counts_;
};

}  // namespace mpopt
