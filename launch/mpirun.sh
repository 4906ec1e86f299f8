#!/usr/bin/env bash
# Launch hfrl with MPI (mpiexec / mpirun).
#
# Usage:  launch/mpirun.sh NPROC [hfrl args...]
#         launch/mpirun.sh 4 layout --json
#         MPIEXEC_ARGS="-hosts node0,node1 -ppn 4" launch/mpirun.sh 8 train examples/ppo.yaml
# hfrl reads rank/size from the MPI launcher's environment (Open MPI: OMPI_COMM_WORLD_*,
# MPICH/Hydra: PMI_*); without MASTER_ADDR, rank 0's address is broadcast with mpi4py.
#
# MPICH (e.g. `pip install mpich`): no extra flags needed, also as root and past the core count.
# Open MPI: as root it needs --allow-run-as-root (or OMPI_ALLOW_RUN_AS_ROOT=1 and
#   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1), and --oversubscribe for more ranks than cores. This script
#   detects Open MPI from `mpiexec --version` and adds --oversubscribe (plus --allow-run-as-root
#   when running as root).
# Environment: MPIEXEC (default mpiexec), PYTHON (default python), MPIEXEC_ARGS (extra flags).
set -euo pipefail

if [ $# -lt 1 ]; then
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0" >&2
    exit 2
fi
NPROC="$1"; shift
MPIEXEC="${MPIEXEC:-mpiexec}"
PYTHON="${PYTHON:-python}"

args=(-n "$NPROC")
if "$MPIEXEC" --version 2>&1 | grep -qi 'open mpi\|open-mpi\|openrte'; then
    args+=(--oversubscribe)
    [ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
fi
# shellcheck disable=SC2206
extra=(${MPIEXEC_ARGS:-})

exec "$MPIEXEC" "${args[@]}" "${extra[@]}" "$PYTHON" -m hfrl.cli "$@"
