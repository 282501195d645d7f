#!/usr/bin/env bash
# mpopt's test command (README, CI: .ci/run). From the repository root:
#   bash scripts/test.sh              format check, Release build + ctest in build/, ASan/UBSan host tests in build-asan/
#   bash scripts/test.sh --configure-only   install missing packages and configure build/ (scripts/demo.sh uses it)
# GPU tests build when nvcc is found and report "skipped" at run time without a device.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the build and tests need. python3-torch, libtorch-dev, python3-dev, pybind11-dev (torch's extension
# headers include it; Debian's torch does not ship it) and ninja-build build and run example 04 (a PyTorch extension)
# on the CPU; python3-torch also regenerates the fixtures.
PACKAGES=(cmake g++ clang-format doctest-dev nlohmann-json3-dev libbenchmark-dev libopenmpi-dev openmpi-bin
  python3-torch libtorch-dev python3-dev pybind11-dev ninja-build)
# The formatter version .clang-format is written for (Debian 12's clang-format); others would reformat differently.
CLANG_FORMAT_MAJOR=14

install_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "== not a Debian system: not installing packages; need: ${PACKAGES[*]}"
    return 0
  fi
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: missing packages (${missing[*]}) and not root" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "== installing: ${missing[*]}" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# nvcc is often installed outside PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# Configures <build dir> <cmake args...>; the generator is chosen only for a new build directory.
configure() {
  local dir=$1
  shift
  local gen=()
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); else gen=(-G "Unix Makefiles"); fi
  fi
  cmake -S . -B "$dir" "${gen[@]}" "$@"
}

configure_build() {
  local cuda_args=()
  if command -v nvcc >/dev/null 2>&1; then cuda_args=(-DCMAKE_CUDA_ARCHITECTURES=90); fi
  configure build -DCMAKE_BUILD_TYPE=Release "${cuda_args[@]}"
}

if [ "${1:-}" = "--configure-only" ]; then
  install_packages
  configure_build
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/test.sh [--configure-only]" >&2
  exit 2
fi

jobs=$(nproc)
start=$SECONDS
phase_start=$SECONDS
phase() {  # ends the previous phase (printing its time) and starts the next
  if [ -n "${phase_name:-}" ]; then echo "== ${phase_name}: $((SECONDS - phase_start)) s"; fi
  phase_name=$1
  phase_start=$SECONDS
  [ -n "$phase_name" ] && echo "== ${phase_name} ..."
  return 0
}

phase "dependencies"
install_packages

phase "format check"
if ! command -v clang-format >/dev/null 2>&1; then
  echo "clang-format not found: format check skipped"
elif [ "$(clang-format --version | sed -n 's/.*version \([0-9]*\).*/\1/p')" != "$CLANG_FORMAT_MAJOR" ]; then
  echo "$(clang-format --version) is not version $CLANG_FORMAT_MAJOR: format check skipped"
else
  dirs=()
  for d in include tests tools examples bench; do [ -d "$d" ] && dirs+=("$d"); done
  find "${dirs[@]}" -type f \( -name '*.hpp' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
    -print0 | xargs -0 -r clang-format --dry-run --Werror
fi

phase "configure build/"
configure_build

phase "build build/"
cmake --build build -j"$jobs"

phase "ctest build/"
ctest --test-dir build --output-on-failure -j"$jobs"

# Debug (-O0 -g): on 2 cores it builds the host tests in ~90 s where -O1 -g takes ~180 s and -O2 -g ~310 s, and the
# slower tests it yields still run in ~20 s.
phase "configure build-asan/ (ASan + UBSan, host tests)"
configure build-asan -DCMAKE_BUILD_TYPE=Debug -DMPOPT_SANITIZE=ON -DMPOPT_ENABLE_CUDA=OFF \
  -DMPOPT_BUILD_TOOLS=OFF -DMPOPT_BUILD_EXAMPLES=OFF -DMPOPT_BUILD_BENCHMARKS=OFF

phase "build build-asan/"
cmake --build build-asan -j"$jobs" --target mpopt_host_tests

phase "ctest build-asan/ -L host"
ctest --test-dir build-asan --output-on-failure -j"$jobs" -L host

phase ""
echo "== all passed in $((SECONDS - start)) s"
