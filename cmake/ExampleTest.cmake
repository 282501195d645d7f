# ctest examples.NN_*: configures and builds the standalone example project EXAMPLE_DIR against this source tree
# (-DMPOPT_SOURCE_DIR, so the example's add_subdirectory branch is used and nothing needs installing), then runs
# its program, under RUN_PREFIX if given (e.g. mpirun -np 2). The program's output is echoed for the test's
# PASS_REGULAR_EXPRESSION.
#   cmake -DEXAMPLE_DIR=... -DPROGRAM=name -DMPOPT_SOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=... -DCXX_COMPILER=...
#         [-DRUN_PREFIX=a;b] -P ExampleTest.cmake
include("${CMAKE_CURRENT_LIST_DIR}/ScriptCommon.cmake")
mpopt_require(ExampleTest.cmake EXAMPLE_DIR PROGRAM MPOPT_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)

# The build directory is kept between runs: a rerun only rebuilds what changed.
mpopt_run("example ${EXAMPLE_DIR}" "configuring" "${CMAKE_COMMAND}" -S "${EXAMPLE_DIR}" -B "${WORK_DIR}"
          -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_BUILD_TYPE=Release
          "-DMPOPT_SOURCE_DIR=${MPOPT_SOURCE_DIR}")
mpopt_run("example ${EXAMPLE_DIR}" "building" "${CMAKE_COMMAND}" --build "${WORK_DIR}")
execute_process(COMMAND ${RUN_PREFIX} "${WORK_DIR}/${PROGRAM}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "example ${EXAMPLE_DIR}: ${PROGRAM} exited ${rc}")
endif()
