// Shared by the Muon checkpoint tests (host and MPI): a snapshot of everything a muon_optimizer holds, each group
// gathered to full size (a Kahan master's compensation too), compared bit for bit.
#pragma once

#include <mpopt/muon.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.hpp"

namespace ckpt_test {

template <class Opt>
struct muon_snapshot {
  std::vector<std::vector<typename Opt::master_t>> master;        // matrix groups, then aux groups
  std::vector<std::vector<typename Opt::master_t>> compensation;  // kahan_summation only; the same order
  std::vector<std::vector<std::vector<typename Opt::state_t>>> states;
  std::vector<double> lr;  // the same order
  std::int64_t step = 0;
  typename Opt::scaler_state_type scaler{};
};

// Collective at ZeRO stages 1-2.
template <class Opt>
muon_snapshot<Opt> take_muon(Opt& o) {
  muon_snapshot<Opt> s;
  for (mpopt::muon_part part : {mpopt::muon_part::matrices, mpopt::muon_part::aux}) {
    const bool matrices = part == mpopt::muon_part::matrices;
    for (std::size_t g = 0; g < (matrices ? o.num_matrix_groups() : o.num_aux_groups()); ++g) {
      std::size_t n = 0;
      for (std::size_t t = 0; t < o.num_tensors(part, g); ++t) n += o.tensor_size(part, g, t);
      s.master.emplace_back(n);
      o.gather_master(part, g, s.master.back().data());
      if constexpr (is_kahan_v<Opt>) {
        s.compensation.emplace_back(n);
        o.gather_compensation(part, g, s.compensation.back().data());
      }
      s.states.emplace_back();
      for (int j = 0; j < o.num_states(part, g); ++j) {
        s.states.back().emplace_back(n);
        o.gather_state(part, g, j, s.states.back().back().data());
      }
      s.lr.push_back(matrices ? o.matrix_hparams(g).lr : o.aux_hparams(g).lr);
    }
  }
  s.step = o.step_count();
  s.scaler = o.scaler_state();
  return s;
}

// "" when equal, else what differs first.
template <class Opt>
std::string diff(const muon_snapshot<Opt>& a, const muon_snapshot<Opt>& b) {
  if (a.step != b.step) return "step " + std::to_string(a.step) + " vs " + std::to_string(b.step);
  if constexpr (!std::is_empty_v<typename Opt::scaler_state_type>)
    if (std::memcmp(&a.scaler, &b.scaler, sizeof a.scaler) != 0) return "scaler state";
  if (a.lr != b.lr) return "lr";
  for (std::size_t g = 0; g < a.master.size(); ++g) {
    if (!same_bits(a.master[g], b.master[g])) return "group " + std::to_string(g) + " master";
    if (g < a.compensation.size() && !same_bits(a.compensation[g], b.compensation[g]))
      return "group " + std::to_string(g) + " compensation";
    for (std::size_t j = 0; j < a.states[g].size(); ++j)
      if (!same_bits(a.states[g][j], b.states[g][j]))
        return "group " + std::to_string(g) + " state " + std::to_string(j);
  }
  return "";
}

}  // namespace ckpt_test
