# Runs mpopt-conformance on CASE once on one rank and once as `MPIEXEC TOOL optimizer CASE --zero-stage STAGE`;
# both must exit 0 and print the same bytes.
execute_process(COMMAND "${TOOL}" optimizer "${CASE}" RESULT_VARIABLE rc1 OUTPUT_VARIABLE single ERROR_VARIABLE err1)
if(NOT rc1 EQUAL 0)
  message(FATAL_ERROR "single-rank run exited ${rc1}: ${err1}")
endif()
execute_process(COMMAND ${MPIEXEC} "${TOOL}" optimizer "${CASE}" --zero-stage ${STAGE} RESULT_VARIABLE rc2
                OUTPUT_VARIABLE sharded ERROR_VARIABLE err2)
if(NOT rc2 EQUAL 0)
  message(FATAL_ERROR "sharded run (${MPIEXEC}) exited ${rc2}: ${err2}")
endif()
if(NOT single STREQUAL sharded)
  string(LENGTH "${single}" n1)
  string(LENGTH "${sharded}" n2)
  message(FATAL_ERROR "ZeRO stage ${STAGE} output differs from the single-rank output (${n1} vs ${n2} characters)\n"
                      "single:  ${single}\nsharded: ${sharded}")
endif()
message(STATUS "identical (${STAGE}): ${single}")
