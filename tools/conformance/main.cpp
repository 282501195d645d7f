// mpopt-conformance: reads one case (JSON) and prints the library's answer (JSON), so anyone can check
// mpopt against a reference they trust.
//   mpopt-conformance optimizer CASE.json   -> {"traj": [...], "master": [...]}
//   mpopt-conformance scaler CASE.json      -> {"scale_before": [...], "hysteresis_after": [...], "raised_at": ...}
//   mpopt-conformance config CONFIG.json    -> the DeepSpeed config resolved: {"precision": ..., "scaler": ...}
//   mpirun -np N mpopt-conformance optimizer CASE.json --zero-stage S
//       the same case sharded with ZeRO stage S over MPI (built with MPI; without it, on one rank); every rank
//       feeds the case's grads, rank 0 prints.
// Exit 0 on success; 2 with a message on stderr for malformed input or an unknown key.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "conformance.hpp"
#include "mpopt/error.hpp"
#if defined(MPOPT_CONFORMANCE_MPI)
#include "mpopt/comm/mpi.hpp"
#endif

namespace mpopt::conformance {
int run_config_command(const std::string& path);  // config_case.cpp
}

namespace {

// nlohmann prints the shortest round-trip form; the contract is 17 significant digits.
void write_json(std::ostream& os, const nlohmann::json& j) {
  if (j.is_array()) {
    os << '[';
    for (std::size_t i = 0; i < j.size(); ++i) {
      if (i) os << ", ";
      write_json(os, j[i]);
    }
    os << ']';
  } else if (j.is_object()) {
    os << '{';
    bool first = true;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!first) os << ", ";
      first = false;
      os << nlohmann::json(it.key()).dump() << ": ";
      write_json(os, it.value());
    }
    os << '}';
  } else if (j.is_number_float()) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", j.get<double>());
    os << buf;
  } else {
    os << j.dump();
  }
}

int usage() {
  std::cerr << "usage: mpopt-conformance optimizer CASE.json [--zero-stage 0|1|2|3]\n"
               "       mpopt-conformance scaler CASE.json\n"
               "       mpopt-conformance config DEEPSPEED_CONFIG.json\n";
  return 2;
}

// MPI for --zero-stage, initialised only then, so the single-rank modes never need an MPI runtime.
struct mpi_session {
  mpopt::comm::communicator* comm = nullptr;
  int rank = 0;
#if defined(MPOPT_CONFORMANCE_MPI)
  std::unique_ptr<mpopt::comm::mpi> mpi;
  mpi_session(int* argc, char*** argv) {
    MPI_Init(argc, argv);
    mpi = std::make_unique<mpopt::comm::mpi>(MPI_COMM_WORLD);
    comm = mpi.get();
    rank = mpi->rank();
  }
  ~mpi_session() {
    mpi.reset();
    MPI_Finalize();
  }
#else
  mpopt::comm::single_rank one;
  mpi_session(int*, char***) {
    comm = &one;
  }
#endif
};

int run(const std::string& mode, const std::string& path, const mpopt::conformance::zero_run& zero, int rank) {
  std::ifstream file(path);
  if (!file) {
    if (rank == 0) std::cerr << "mpopt-conformance: cannot open " << path << "\n";
    return 2;
  }
  try {
    const nlohmann::json in = nlohmann::json::parse(file);
    using namespace mpopt::conformance;
    const nlohmann::json out = mode == "optimizer" ? run_optimizer_case(in, zero) : run_scaler_case(in);
    std::ostringstream os;
    write_json(os, out);
    if (rank == 0) std::cout << os.str() << "\n";
    return 0;
  } catch (const nlohmann::json::parse_error& e) {
    if (rank == 0) std::cerr << "mpopt-conformance: " << path << " is not valid JSON: " << e.what() << "\n";
  } catch (const mpopt::conformance::bad_input& e) {
    if (rank == 0) std::cerr << "mpopt-conformance: " << path << ": " << e.what() << "\n";
  } catch (const mpopt::error& e) {
    if (rank == 0) std::cerr << "mpopt-conformance: " << path << ": " << e.what() << "\n";
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5) return usage();
  const std::string mode = argv[1], path = argv[2];
  if (mode == "config" && argc == 3) return mpopt::conformance::run_config_command(path);
  if (mode != "optimizer" && mode != "scaler") return usage();
  if (argc == 3) return run(mode, path, {}, 0);
  if (mode != "optimizer" || std::string(argv[3]) != "--zero-stage") return usage();
  const std::string stage = argv[4];
  if (stage.size() != 1 || stage[0] < '0' || stage[0] > '3') {
    std::cerr << "mpopt-conformance: --zero-stage must be 0, 1, 2 or 3, got \"" << stage << "\"\n";
    return 2;
  }
  mpi_session session(&argc, &argv);
  return run(mode, path, {session.comm, stage[0] - '0'}, session.rank);
}
