#!/usr/bin/env bash
# Packs into .gpu-kit/ (ignored by git) what a GPU machine without Debian's dev packages needs to build and run
# mpopt's GPU tests and benchmarks: doctest and nlohmann-json (headers and CMake configs), Google Benchmark (headers,
# CMake config, shared library) and this machine's libstdc++ (libbenchmark.so was built against it). Run it here
# (Debian, after scripts/test.sh installed the packages); carry .gpu-kit to the GPU machine, where
# scripts/gpu_session.sh uses it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kit=.gpu-kit
multiarch=/usr/lib/x86_64-linux-gnu
rm -rf "$kit"
copy() {
  local p
  for p in "$@"; do
    [ -e "$p" ] || { echo "gpu_kit: $p is missing (install doctest-dev nlohmann-json3-dev libbenchmark-dev)" >&2; exit 1; }
    mkdir -p "$kit$(dirname "$p")"
    cp -a "$p" "$kit$p"
  done
}
copy /usr/include/doctest /usr/lib/cmake/doctest \
  /usr/include/nlohmann /usr/share/cmake/nlohmann_json \
  /usr/include/benchmark "$multiarch/cmake/benchmark" "$multiarch"/libbenchmark.so* "$multiarch/libbenchmark_main.a"
# Debian's doctest config names /usr as its prefix: make it relative to where the config lies, as the others are.
sed -i 's#^set(_IMPORT_PREFIX "/usr")$#get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)#' \
  "$kit/usr/lib/cmake/doctest/doctestTargets.cmake"
mkdir -p "$kit/runtime"
cp -aL "$multiarch/libstdc++.so.6" "$kit/runtime/"
du -sh "$kit"
