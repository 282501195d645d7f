#!/usr/bin/env bash
# A GPU session's work, on the GPU machine from the repository root, in stages that each fit a 10-minute command.
# build-gpu/ holds the build between stages (carry it if the machine is a fresh one).
#   bash scripts/gpu_session.sh build          configure (Release, sm_90) and build the GPU tests and benchmarks
#   bash scripts/gpu_session.sh test [regex]   ctest -L gpu without memcheck (optionally only tests matching regex)
#   bash scripts/gpu_session.sh memcheck [regex]   the same tests under compute-sanitizer memcheck
#   bash scripts/gpu_session.sh bench [binary [filter]]   CUDA benchmarks: all, or one binary with a benchmark filter
#   bash scripts/gpu_session.sh torch          bench/compare_torch.py: mpopt against torch's fused AdamW
# Results (logs, JSON, tables) go to $OUT when set (the device tool's folder), else bench/gpu-results/. Where the
# machine lacks doctest, nlohmann-json or Google Benchmark, .gpu-kit/ (scripts/gpu_kit.sh) supplies them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage=${1:?usage: gpu_session.sh build|test|memcheck|bench|torch [args]}
out=${OUT:-bench/gpu-results}
mkdir -p "$out"
build=build-gpu
arch=${CUDAARCHS:-90}
cmake_args=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DMPOPT_BUILD_TESTS=ON
  -DMPOPT_BUILD_BENCHMARKS=ON -DMPOPT_BUILD_EXAMPLES=OFF)
if [ -d .gpu-kit ]; then
  kit=$PWD/.gpu-kit
  cmake_args+=("-DCMAKE_PREFIX_PATH=$kit/usr" "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$kit/runtime")
  export LD_LIBRARY_PATH="$kit/usr/lib/x86_64-linux-gnu:$kit/runtime${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

case $stage in
  build)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv | tee "$out/gpu.csv" || true
    [ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" "${generator[@]}" "${cmake_args[@]}" 2>&1 | tee "$out/configure.log"
    # The GPU executables only: the host tests are CI's.
    mapfile -t targets < <(cmake --build "$build" --target help |
      grep -oE 'mpopt_(test_cuda|test_nccl|test_threaded|bench_cuda|bench_offload|bench_onebit_cuda|bench_muon_cuda)[A-Za-z0-9_]*' |
      sort -u)
    [ ${#targets[@]} -gt 0 ] || { echo "gpu_session: no GPU targets (was CUDA found?)" >&2; exit 1; }
    cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" 2>&1 | tee "$out/build.log"
    ;;
  test)
    ctest --test-dir "$build" -L gpu -LE memcheck --output-on-failure ${2:+-R "$2"} 2>&1 | tee "$out/ctest.log"
    ;;
  memcheck)
    ctest --test-dir "$build" -L memcheck --output-on-failure ${2:+-R "$2"} 2>&1 | tee "$out/memcheck.log"
    ;;
  bench)
    binaries=(mpopt_bench_cuda mpopt_bench_onebit_cuda mpopt_bench_offload mpopt_bench_muon_cuda)
    [ -n "${2:-}" ] && binaries=("$2")
    for b in "${binaries[@]}"; do
      exe=$build/bench/$b
      [ -x "$exe" ] || { echo "gpu_session: $exe not built" >&2; continue; }
      OMP_NUM_THREADS=$(nproc) "$exe" --benchmark_counters_tabular=true ${3:+"--benchmark_filter=$3"} \
        --benchmark_out="$out/$b.json" --benchmark_out_format=json 2>&1 | tee "$out/$b.txt"
    done
    ;;
  torch)
    PYTHONUNBUFFERED=1 python3 bench/compare_torch.py --mpopt-bench "$build/bench/mpopt_bench_cuda" \
      --sizes 1048576,16777216,268435456,1073741824 --markdown --json "$out/compare_torch.json" 2>&1 |
      tee "$out/compare_torch.md"
    ;;
  *)
    echo "gpu_session: unknown stage '$stage' (build, test, memcheck, bench, torch)" >&2
    exit 2
    ;;
esac
