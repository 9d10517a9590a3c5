#!/usr/bin/env bash
# Run one benchmark in the isolated environment: bash scripts/bench.sh NAME [options], NAME one of
# quality, quality_dit, compare_grid, speed, speed_flux, families, plans, scaling, paper_protocol
# (each prints its table and writes bench/results/<name>*.{json,md}; --help lists its options).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
name=${1:?"which benchmark: quality, quality_dit, compare_grid, speed, speed_flux, families, plans, scaling or paper_protocol"}
shift
exec "$PYTHON" -m "bench.$name" "$@"
