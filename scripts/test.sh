#!/usr/bin/env bash
# Run the whole test suite in the isolated environment (built on first use by setup_env.sh).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k solver -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ITERIS_ENV=${ITERIS_ENV:-$HOME/.cache/comfyui-iteris}
export ITERIS_ENV
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ITERIS_ENV/venv/bin/python" -m pytest "$@"
