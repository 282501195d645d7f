# ctest packaging.find_package: installs the library component of the mpopt build in MPOPT_BINARY_DIR under
# WORK_DIR/prefix, then configures and builds a small project that does find_package(mpopt MPOPT_VERSION) and links
# mpopt::mpopt, and runs it.
#   cmake -DMPOPT_BINARY_DIR=... -DWORK_DIR=... -DGENERATOR=... -DCXX_COMPILER=... -DMPOPT_VERSION=...
#         -P FindPackageTest.cmake
include("${CMAKE_CURRENT_LIST_DIR}/ScriptCommon.cmake")
mpopt_require(FindPackageTest.cmake MPOPT_BINARY_DIR WORK_DIR GENERATOR CXX_COMPILER MPOPT_VERSION)

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(src "${WORK_DIR}/consumer")
# Only the library's component: the test needs no tool to have been built.
mpopt_run("packaging test" "cmake --install" "${CMAKE_COMMAND}" --install "${MPOPT_BINARY_DIR}" --prefix "${prefix}"
          --component mpopt)

file(WRITE "${src}/CMakeLists.txt" "cmake_minimum_required(VERSION 3.25)
project(mpopt_consumer LANGUAGES CXX)
find_package(mpopt ${MPOPT_VERSION} REQUIRED)
string(FIND \"\${mpopt_DIR}\" \"${prefix}/\" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR \"found mpopt in \${mpopt_DIR}, not in the test prefix ${prefix}\")
endif()
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE mpopt::mpopt)
")
file(WRITE "${src}/main.cpp" [=[
#include <mpopt/config.hpp>
#include <mpopt/numeric/convert.hpp>

static_assert(MPOPT_VERSION_MAJOR * 10000 + MPOPT_VERSION_MINOR * 100 + MPOPT_VERSION_PATCH == MPOPT_VERSION);

int main() { return float(mpopt::convert<mpopt::bf16_t>(1.0f)) == 1.0f ? 0 : 1; }
]=])

mpopt_build_and_run_consumer("packaging test" "${src}" "${WORK_DIR}/build" "-DCMAKE_PREFIX_PATH=${prefix}"
                              -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
message(STATUS "find_package(mpopt ${MPOPT_VERSION}) from ${prefix}: configured, built and ran a consumer")
