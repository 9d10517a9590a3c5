#!/usr/bin/env bash
# Run the whole test suite in the isolated environment (built on first use by setup_env.sh).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k solver -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PYTHON" -m pytest "$@"
