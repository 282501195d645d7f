// The doctest runner for mpopt_host_tests; the test cases live in tests/host/test_*.cpp.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
