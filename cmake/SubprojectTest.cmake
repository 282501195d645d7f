# ctest packaging.add_subdirectory / packaging.fetchcontent: configures, builds and runs a small consumer project
# that gets mpopt from this source tree with add_subdirectory(MPOPT_SOURCE_DIR) or FetchContent (SOURCE_DIR, so no
# network and no copy), and links mpopt::mpopt. mpopt's own tests, tools, examples, benchmarks and CUDA must stay
# off in a subproject (the defaults when it is not the top-level project); the consumer checks that.
#   cmake -DMODE=add_subdirectory|fetchcontent -DMPOPT_SOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=...
#         -DCXX_COMPILER=... -P SubprojectTest.cmake
include("${CMAKE_CURRENT_LIST_DIR}/ScriptCommon.cmake")
mpopt_require(SubprojectTest.cmake MODE MPOPT_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)

file(REMOVE_RECURSE "${WORK_DIR}")
set(src "${WORK_DIR}/consumer")
if(MODE STREQUAL "add_subdirectory")
  set(get_mpopt "add_subdirectory(\"${MPOPT_SOURCE_DIR}\" \"\${CMAKE_BINARY_DIR}/mpopt\")")
elseif(MODE STREQUAL "fetchcontent")
  set(get_mpopt "include(FetchContent)
FetchContent_Declare(mpopt SOURCE_DIR \"${MPOPT_SOURCE_DIR}\")
FetchContent_MakeAvailable(mpopt)")
else()
  message(FATAL_ERROR "SubprojectTest.cmake: MODE must be add_subdirectory or fetchcontent, got ${MODE}")
endif()

file(WRITE "${src}/CMakeLists.txt" "cmake_minimum_required(VERSION 3.25)
project(mpopt_consumer LANGUAGES CXX)
${get_mpopt}
foreach(t mpopt_host_tests mpopt-conformance mpopt_demo)
  if(TARGET \${t})
    message(FATAL_ERROR \"mpopt as a subproject defined its developer target \${t}\")
  endif()
endforeach()
get_property(langs GLOBAL PROPERTY ENABLED_LANGUAGES)
if(\"CUDA\" IN_LIST langs)
  message(FATAL_ERROR \"mpopt as a subproject enabled CUDA\")
endif()
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE mpopt::mpopt)
")
# One SGD step in fp32 on the host: w = 1 - 0.5 * 1.
file(WRITE "${src}/main.cpp" [=[
#include <cstdio>
#include <vector>

#include <mpopt/optimizer.hpp>
#include <mpopt/rule/sgd.hpp>

int main() {
  std::vector<float> w(8, 1.f), g(8, 1.f);
  mpopt::param_group<mpopt::sgd, mpopt::fp32_policy> group;
  group.params = w.data();
  group.grads = g.data();
  group.size = w.size();
  group.hparams.lr = 0.5;
  mpopt::optimizer<mpopt::sgd, mpopt::fp32_policy> opt({group});
  const bool ok = opt.step().applied && w[7] == 0.5f;
  std::printf("consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
]=])

mpopt_build_and_run_consumer("packaging test (${MODE})" "${src}" "${WORK_DIR}/build" -DCMAKE_BUILD_TYPE=Release)
message(STATUS "${MODE}: configured, built and ran a consumer of mpopt::mpopt")
