#!/usr/bin/env bash
# Packs this machine's build of the GPU tests and benchmarks into .gpu-pack/ (ignored by git), so that a GPU session
# spends its few minutes running them rather than compiling them (the CUDA translation units take minutes each).
# Built by this machine's nvcc (13.0, as on the GPU machines) for CMAKE_CUDA_ARCHITECTURES of the build (90: H100 and
# H200). Carry .gpu-pack to the GPU machine and run `bash scripts/gpu_session.sh prebuilt` there.
#   bash scripts/gpu_pack.sh [build dir]   (default build/, configured by scripts/test.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=${1:-build}
pack=.gpu-pack
[ -f "$build/CMakeCache.txt" ] || { echo "gpu_pack: $build is not configured (run scripts/test.sh)" >&2; exit 1; }
mapfile -t targets < <(cmake --build "$build" --target help |
  grep -oE 'mpopt_(test_cuda|test_nccl|test_threaded|bench_cuda|bench_offload|bench_onebit_cuda|bench_muon_cuda)[A-Za-z0-9_]*' |
  sort -u)
[ ${#targets[@]} -gt 0 ] || { echo "gpu_pack: no GPU targets in $build (was CUDA found?)" >&2; exit 1; }
cmake --build "$build" --target "${targets[@]}"

rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/lib"
for t in "${targets[@]}"; do
  exe=$(find "$build" -maxdepth 2 -type f -name "$t" -perm -u+x | head -1)
  [ -n "$exe" ] || { echo "gpu_pack: $t was not built" >&2; exit 1; }
  cp "$exe" "$pack/bin/"
  strip "$pack/bin/$t"  # host symbols only: the device code (.nv_fatbin) stays
done
# Libraries the GPU machine lacks: Google Benchmark (Debian's build). CUDA's, cuBLAS and NCCL are there (the CUDA
# toolkit; NCCL from torch's nvidia-nccl wheel), and Debian 12's libstdc++ is older than theirs.
for lib in $(ldd "$pack"/bin/* 2>/dev/null | awk '/libbenchmark/ {print $3}' | sort -u); do
  cp -L "$lib" "$pack/lib/"
done
sed -n 's/^CMAKE_CUDA_ARCHITECTURES[^=]*=//p' "$build/CMakeCache.txt" >"$pack/cuda-architectures"
git rev-parse --short HEAD >"$pack/commit" 2>/dev/null || true
du -sh "$pack"
size=$(du -sm "$pack" | cut -f1)
[ "$size" -lt 56 ] || { echo "gpu_pack: $pack is ${size} MiB; a device call carries 64 MiB with the tree" >&2; exit 1; }
