#!/usr/bin/env bash
# Run one benchmark in the isolated environment: bash scripts/bench.sh quality|speed|scaling|paper_protocol [options]
# (each prints its table and writes bench/results/<name>*.{json,md}; --help lists its options).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
name=${1:?"which benchmark: quality, speed, scaling or paper_protocol"}
shift
exec "$PYTHON" -m "bench.$name" "$@"
