#!/usr/bin/env bash
# Set up the isolated environment and run the embedded demo: two generated LoRAs merged with IterIS
# on a small generated SD1-type model (nothing is downloaded). Output folder: $1 (default iteris-demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PYTHON" -m iteris_core demo --out "${1:-iteris-demo}"
