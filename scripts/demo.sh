#!/usr/bin/env bash
# mpopt's demo (README): installs what is missing, configures build/ as the tests do, builds only the demo and
# runs it. Arguments are passed to the demo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "configuring build/ ..."
bash scripts/test.sh --configure-only >/dev/null
cmake --build build -j"$(nproc)" --target mpopt_demo
exec build/examples/mpopt_demo "$@"
