# Shared by the cmake -P test scripts in this directory (FindPackageTest, SubprojectTest, ExampleTest).

# mpopt_require(<script> <var>...): fails unless each -D<var>=... was given.
function(mpopt_require script)
  foreach(var IN LISTS ARGN)
    if(NOT DEFINED ${var})
      message(FATAL_ERROR "${script}: -D${var}=... is required")
    endif()
  endforeach()
endfunction()

# mpopt_run(<context> <what> <command>...): runs the command; on failure prints its output and fails naming <what>.
function(mpopt_run context what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(NOTICE "${out}")
    message(FATAL_ERROR "${context}: ${what} failed (${rc})")
  endif()
endfunction()

# mpopt_build_and_run_consumer(<context> <source dir> <build dir> <configure args>...): configures the consumer
# project with GENERATOR and CXX_COMPILER plus the given arguments, builds it, and runs its program `consumer`.
function(mpopt_build_and_run_consumer context src build)
  mpopt_run("${context}" "configuring the consumer" "${CMAKE_COMMAND}" -S "${src}" -B "${build}" -G "${GENERATOR}"
            "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" ${ARGN})
  mpopt_run("${context}" "building the consumer" "${CMAKE_COMMAND}" --build "${build}")
  mpopt_run("${context}" "running the consumer" "${build}/consumer")
endfunction()
