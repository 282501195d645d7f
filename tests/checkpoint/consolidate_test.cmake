# The mpopt-consolidate ctest: FIXTURE (a ;-list command) writes a sharded checkpoint into $MPOPT_CHECKPOINT_FIXTURE
# and a Kahan one (bf16 master + compensation) into $MPOPT_CHECKPOINT_FIXTURE_KAHAN, TOOL consolidates each (the
# default dtype with states, and bf16), and, where PYTHON is set, CHECKER verifies the files independently of the
# library (check_checkpoint.py).
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(ckpt "${WORK_DIR}/ckpt")
set(ckpt_kahan "${WORK_DIR}/ckpt_kahan")
function(run_ok)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT code STREQUAL "0")
    message(FATAL_ERROR "failed (${code}): ${ARGN}\nstdout: ${out}\nstderr: ${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run_ok(${CMAKE_COMMAND} -E env "MPOPT_CHECKPOINT_FIXTURE=${ckpt}" "MPOPT_CHECKPOINT_FIXTURE_KAHAN=${ckpt_kahan}"
       ${FIXTURE})
foreach(dir IN ITEMS "${ckpt}" "${ckpt_kahan}")
  if(NOT EXISTS "${dir}/index.json")
    message(FATAL_ERROR "the fixture wrote no ${dir}/index.json")
  endif()
  run_ok("${TOOL}" "${dir}" "${dir}.full.safetensors" --states)
  run_ok("${TOOL}" "${dir}" "${dir}.full_bf16.safetensors" --dtype bf16)
  if(PYTHON)
    run_ok("${PYTHON}" "${CHECKER}" "${TOOL}" "${dir}" "${dir}.full.safetensors" "${dir}.full_bf16.safetensors")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
