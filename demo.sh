#!/usr/bin/env bash
# The main job: install, then run the example suite on a real backend through the pool.
# Usage: bash demo.sh [podman|qemu] [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")"
backend="${1:-podman}"
shift || true
bash .ci/install
python3 -m pytest -n 2 --vm-pool-size 2 --vm-backend "$backend" examples/ "$@"
python3 -m vmpool.cli status
