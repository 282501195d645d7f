#!/usr/bin/env bash
# A GPU session's work, on the GPU machine from the repository root.
#
# The quick way (a device call is at most 10 minutes, a session's device time 15, and a machine stays warm 30 s):
# build here with scripts/gpu_pack.sh, carry .gpu-pack, and run everything in one call:
#   bash scripts/gpu_session.sh prebuilt [seconds]   the packed tests, benchmarks (16M and 256M params), the torch
#                                                    comparison, then memcheck, in that order, each bounded so the
#                                                    whole ends within `seconds` (default 540)
# Or build there, each stage a separate 10-minute command (build-gpu/ must survive between them: chain them in one
# call, as the machine is usually given back between calls):
#   bash scripts/gpu_session.sh build          configure (Release, sm_90) and build the GPU tests and benchmarks
#   bash scripts/gpu_session.sh test [regex]   ctest -L gpu without memcheck (optionally only tests matching regex)
#   bash scripts/gpu_session.sh memcheck [regex]   the same tests under compute-sanitizer memcheck (not the large one)
#   bash scripts/gpu_session.sh bench [binary [filter]]   CUDA benchmarks: all, or one binary with a benchmark filter
#   bash scripts/gpu_session.sh torch          bench/compare_torch.py: mpopt against torch's fused AdamW
# Results go to $OUT when set (the device tool's folder, which returns at most 8 files: prebuilt writes two), else
# bench/gpu-results/. Where the machine lacks doctest, nlohmann-json or Google Benchmark, .gpu-kit/
# (scripts/gpu_kit.sh) supplies them to the build stage. A missing GPU fails the tests (MPOPT_REQUIRE_GPU=1) instead
# of skipping them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage=${1:?usage: gpu_session.sh prebuilt|build|test|memcheck|bench|torch [args]}
out=${OUT:-bench/gpu-results}
mkdir -p "$out"
build="build-gpu"
arch=${CUDAARCHS:-90}
export MPOPT_REQUIRE_GPU=1
cmake_args=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DMPOPT_BUILD_TESTS=ON
  -DMPOPT_BUILD_BENCHMARKS=ON -DMPOPT_BUILD_EXAMPLES=OFF)
if [ -d .gpu-kit ]; then
  kit=$PWD/.gpu-kit
  cmake_args+=("-DCMAKE_PREFIX_PATH=$kit/usr" "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$kit/runtime")
  export LD_LIBRARY_PATH="$kit/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Debian's libstdc++ only where the machine's is older (it would break programs built by a newer g++ there).
  if ! grep -qa GLIBCXX_3.4.30 "$(g++ -print-file-name=libstdc++.so.6)" 2>/dev/null; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$kit/runtime"
  fi
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
# NCCL for the NCCL tests: the toolkit's, or torch's nvidia-nccl wheel.
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null ||
  true)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64:/usr/local/cuda/lib${nccl_lib:+:$nccl_lib}"

bench_binaries=(mpopt_bench_cuda mpopt_bench_onebit_cuda mpopt_bench_offload mpopt_bench_muon_cuda)
# The sizes the prebuilt stage measures: HBM-bound (2^20 params fit in the L2 cache), and quick to set up.
bench_filter() {
  case $1 in
    mpopt_bench_cuda) echo '/(16777216|268435456)/' ;;  # names end in /manual_time (and /iterations:20)
    mpopt_bench_onebit_cuda) echo '/(16M|256M)/' ;;
    mpopt_bench_offload) echo '/16777216/' ;;
    *) echo '.' ;;
  esac
}

case $stage in
  prebuilt)
    pack=.gpu-pack
    [ -d "$pack/bin" ] || { echo "gpu_session: no $pack/bin (run scripts/gpu_pack.sh here and carry .gpu-pack)" >&2; exit 1; }
    export LD_LIBRARY_PATH="$PWD/$pack/lib:$LD_LIBRARY_PATH"
    budget=${2:-540}
    deadline=$((SECONDS + budget))
    res=$(mktemp -d)/gpu-results
    mkdir -p "$res"
    summary=$res/summary.txt
    set +e
    # run_step NAME LIMIT COMMAND...: bounded by LIMIT and by what is left of the budget; a line in the summary.
    run_step() {
      local name=$1 limit=$2 left rc start=$SECONDS
      shift 2
      left=$((deadline - SECONDS))
      if [ "$left" -lt 15 ]; then
        echo "SKIP (out of time) $name" >>"$summary"
        return
      fi
      [ "$limit" -le "$left" ] || limit=$left
      timeout -k 5 "$limit" "$@" >"$res/$name.log" 2>&1
      rc=$?
      if [ $rc -eq 0 ]; then
        echo "PASS $name $((SECONDS - start))s" >>"$summary"
      elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "FAIL(timed out) $name $((SECONDS - start))s" >>"$summary"
      else
        echo "FAIL(rc=$rc) $name $((SECONDS - start))s" >>"$summary"
      fi
    }
    {
      echo "pack commit $(cat "$pack/commit" 2>/dev/null), sm_$(cat "$pack/cuda-architectures" 2>/dev/null), $(date -u)"
      nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv,noheader
    } >"$summary" 2>&1
    for t in "$pack"/bin/mpopt_test_*; do
      [ "$(basename "$t")" = mpopt_test_cuda_large ] && continue  # last: 21 GB, the slowest
      run_step "$(basename "$t")" 150 "$t"
    done
    for b in "${bench_binaries[@]}"; do
      [ -x "$pack/bin/$b" ] || continue
      run_step "$b" 150 "$pack/bin/$b" --benchmark_min_time=0.1 --benchmark_counters_tabular=true \
        "--benchmark_filter=$(bench_filter "$b")" "--benchmark_out=$res/$b.json" --benchmark_out_format=json
    done
    run_step compare_torch 180 env PYTHONUNBUFFERED=1 python3 bench/compare_torch.py \
      --mpopt-bench "$pack/bin/mpopt_bench_cuda" --sizes 16777216,268435456 --iters 20 --markdown \
      --json "$res/compare_torch.json"
    [ -x "$pack/bin/mpopt_test_cuda_large" ] && run_step mpopt_test_cuda_large 120 "$pack/bin/mpopt_test_cuda_large"
    sanitizer=$(command -v compute-sanitizer || true)
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
      [ -z "$sanitizer" ] && [ -x "$c" ] && sanitizer=$c
    done
    if [ -n "$sanitizer" ]; then
      for t in "$pack"/bin/mpopt_test_*; do
        case $(basename "$t") in mpopt_test_cuda_large) continue ;; esac
        run_step "memcheck.$(basename "$t")" 120 "$sanitizer" --tool memcheck --error-exitcode 1 "$t"
      done
    else
      echo "SKIP memcheck: no compute-sanitizer on the PATH" >>"$summary"
    fi
    cp "$summary" "$out/summary.txt"
    tar -czf "$out/gpu-results.tar.gz" -C "$(dirname "$res")" gpu-results
    cat "$summary"
    ! grep -q '^FAIL' "$summary"
    ;;
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
    ctest --test-dir "$build" -L gpu -LE memcheck --timeout 150 --no-tests=error --output-on-failure \
      ${2:+-R "$2"} 2>&1 | tee "$out/ctest.log"
    ;;
  memcheck)
    ctest --test-dir "$build" -L memcheck -E large --timeout 300 --no-tests=error --output-on-failure \
      ${2:+-R "$2"} 2>&1 | tee "$out/memcheck.log"
    ;;
  bench)
    binaries=("${bench_binaries[@]}")
    [ -n "${2:-}" ] && binaries=("$2")
    for b in "${binaries[@]}"; do
      exe=$build/bench/$b
      [ -x "$exe" ] || { echo "gpu_session: $exe not built" >&2; continue; }
      OMP_NUM_THREADS=$(nproc) "$exe" --benchmark_counters_tabular=true ${3:+"--benchmark_filter=$3"} \
        --benchmark_out="$out/$b.json" --benchmark_out_format=json 2>&1 | tee "$out/$b.txt" ||
        echo "gpu_session: $b failed" >&2
    done
    ;;
  torch)
    PYTHONUNBUFFERED=1 python3 bench/compare_torch.py --mpopt-bench "$build/bench/mpopt_bench_cuda" \
      --sizes 1048576,16777216,268435456,1073741824 --markdown --json "$out/compare_torch.json" 2>&1 |
      tee "$out/compare_torch.md"
    ;;
  *)
    echo "gpu_session: unknown stage '$stage' (prebuilt, build, test, memcheck, bench, torch)" >&2
    exit 2
    ;;
esac
