#!/usr/bin/env bash
# Run the whole test suite in the isolated environment (built on first use by setup_env.sh).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k solver -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# OpenMP threads that spin while waiting stall badly when other jobs share the cores
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PYTHON" -m pytest "$@"
