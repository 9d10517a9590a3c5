#!/usr/bin/env bash
# Set up the isolated environment and run the embedded demo: two generated LoRAs merged with IterIS
# on a small generated SD1-type model (nothing is downloaded). Output folder: $1 (default iteris-demo).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ITERIS_ENV=${ITERIS_ENV:-$HOME/.cache/comfyui-iteris}
export ITERIS_ENV
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ITERIS_ENV/venv/bin/python" -m iteris_core demo --out "${1:-iteris-demo}"
