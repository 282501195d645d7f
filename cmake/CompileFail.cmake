# Compile-fail tests: a source file states, on its first line, what the compiler must do with it:
#
#   // expect-error: <regex>    compilation must fail, and a diagnostic must match <regex> (a CMake regex,
#                               searched in the compiler's output, source excerpts switched off)
#   // expect-compiles          compilation must succeed (a control, so a broken harness cannot pass)
#
# include(CompileFail) defines mpopt_add_compile_fail_tests(); `cmake -P CompileFail.cmake` runs one check:
#   cmake -DCOMPILER=<c++> -DSOURCE=<file> -DINCLUDE_DIR=<dir> [-DEXPECT=<first-line override>] -P CompileFail.cmake

# Parses an expectation line into <kind_var> (error | compiles | empty when the line is not one) and <regex_var>.
function(mpopt_parse_expectation line kind_var regex_var)
  set(kind "")
  set(regex "")
  if(line MATCHES "^//[ \t]*expect-error:[ \t]*(.*[^ \t\r])[ \t\r]*$")
    set(kind error)
    set(regex "${CMAKE_MATCH_1}")
  elseif(line MATCHES "^//[ \t]*expect-compiles[ \t\r]*$")
    set(kind compiles)
  endif()
  set(${kind_var} "${kind}" PARENT_SCOPE)
  set(${regex_var} "${regex}" PARENT_SCOPE)
endfunction()

function(mpopt_read_first_line file out_var)
  file(READ "${file}" head LIMIT 4096)
  string(REGEX MATCH "^[^\n]*" first "${head}")
  set(${out_var} "${first}" PARENT_SCOPE)
endfunction()

if(NOT CMAKE_SCRIPT_MODE_FILE)
  set(_mpopt_compile_fail_script "${CMAKE_CURRENT_LIST_FILE}")

  # One ctest (label compile_fail) per <dir>/*.cpp, plus two checks that the harness itself rejects what it must.
  function(mpopt_add_compile_fail_tests dir include_dir)
    file(GLOB sources CONFIGURE_DEPENDS "${dir}/*.cpp")
    set(run ${CMAKE_COMMAND} "-DCOMPILER=${CMAKE_CXX_COMPILER}" "-DINCLUDE_DIR=${include_dir}")
    set(a_control "")
    set(an_error "")
    foreach(src IN LISTS sources)
      get_filename_component(stem "${src}" NAME_WE)
      mpopt_read_first_line("${src}" first)
      mpopt_parse_expectation("${first}" kind regex)
      if(NOT kind)
        message(FATAL_ERROR "${src}: the first line must be `// expect-error: <regex>` or `// expect-compiles`")
      elseif(kind STREQUAL "compiles")
        set(a_control "${src}")
      else()
        set(an_error "${src}")
      endif()
      add_test(NAME compile_fail.${stem} COMMAND ${run} "-DSOURCE=${src}" -P "${_mpopt_compile_fail_script}")
      set_tests_properties(compile_fail.${stem} PROPERTIES LABELS compile_fail)
    endforeach()

    # The harness must fail a file that compiles when an error is expected, and an error whose message differs.
    if(a_control)
      add_test(NAME compile_fail.harness_rejects_success
               COMMAND ${run} "-DSOURCE=${a_control}" "-DEXPECT=// expect-error: ." -P "${_mpopt_compile_fail_script}")
      set_tests_properties(compile_fail.harness_rejects_success PROPERTIES
                           LABELS compile_fail PASS_REGULAR_EXPRESSION "compiled, but an error was expected")
    endif()
    if(an_error)
      add_test(NAME compile_fail.harness_rejects_other_error
               COMMAND ${run} "-DSOURCE=${an_error}" "-DEXPECT=// expect-error: no diagnostic says this"
                       -P "${_mpopt_compile_fail_script}")
      set_tests_properties(compile_fail.harness_rejects_other_error PROPERTIES
                           LABELS compile_fail PASS_REGULAR_EXPRESSION "failed as expected, but no diagnostic matches")
    endif()
  endfunction()
  return()
endif()

# ---- script mode: one check ----
foreach(var COMPILER SOURCE INCLUDE_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "CompileFail.cmake: -D${var}=... is required")
  endif()
endforeach()
if(DEFINED EXPECT)
  set(first "${EXPECT}")
else()
  mpopt_read_first_line("${SOURCE}" first)
endif()
mpopt_parse_expectation("${first}" kind regex)
if(NOT kind)
  message(FATAL_ERROR "${SOURCE}: no expectation; the first line must be `// expect-error: <regex>` or "
                      "`// expect-compiles`")
endif()

set(ENV{LC_ALL} C)  # English diagnostics, whatever the machine's locale
execute_process(COMMAND "${COMPILER}" -std=c++17 -fsyntax-only -fno-diagnostics-show-caret "-I${INCLUDE_DIR}"
                        "${SOURCE}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)

# Verdicts go out through message(NOTICE), which prints text as is (FATAL_ERROR re-wraps long lines).
function(_mpopt_fail text)
  message(NOTICE "${text}")
  message(FATAL_ERROR "compile-fail check failed: ${SOURCE}")
endfunction()

if(kind STREQUAL "compiles")
  if(NOT rc EQUAL 0)
    _mpopt_fail("${SOURCE}: expected to compile, but the compiler failed (${rc}):\n${out}")
  endif()
  message(STATUS "${SOURCE}: compiles, as expected")
elseif(rc EQUAL 0)
  _mpopt_fail("${SOURCE}: compiled, but an error was expected matching: ${regex}\n${out}")
elseif(NOT out MATCHES "${regex}")
  _mpopt_fail("${SOURCE}: failed as expected, but no diagnostic matches: ${regex}\nCompiler output:\n${out}")
else()
  string(REGEX MATCH "[^\n]*(${regex})[^\n]*" hit "${out}")
  message(STATUS "${SOURCE}: fails as expected:\n  ${hit}")
endif()
