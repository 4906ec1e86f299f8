#!/usr/bin/env bash
# Launch hfrl with torchrun.
#
# Usage:  launch/torchrun.sh NPROC [hfrl args...]
#   one node:    launch/torchrun.sh 4 train examples/ppo.yaml trainer.total_steps=10
#                launch/torchrun.sh 4 layout --json
#   multi-node:  run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and that
#                node's NODE_RANK (0..NNODES-1):
#                NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh 8 train ...
#   RDZV=c10d additionally switches multi-node rendezvous to torchrun's c10d backend at
#   MASTER_ADDR:MASTER_PORT (elastic style; NODE_RANK is then assigned by torchrun).
# Environment: NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR, MASTER_PORT, RDZV.
# Extra torchrun flags: TORCHRUN_ARGS="--max-restarts 0 ..." (word-split).
set -euo pipefail

if [ $# -lt 1 ]; then
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0" >&2
    exit 2
fi
NPROC="$1"; shift

args=(--nproc-per-node "$NPROC")
NNODES="${NNODES:-1}"
if [ "$NNODES" != 1 ]; then
    args+=(--nnodes "$NNODES")
    : "${MASTER_ADDR:?multi-node needs MASTER_ADDR}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    if [ "${RDZV:-}" = c10d ]; then
        args+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
    else
        args+=(--node-rank "${NODE_RANK:-0}" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    fi
else
    [ -n "${MASTER_ADDR:-}" ] && args+=(--master-addr "$MASTER_ADDR")
    [ -n "${MASTER_PORT:-}" ] && args+=(--master-port "$MASTER_PORT")
fi
# shellcheck disable=SC2206
extra=(${TORCHRUN_ARGS:-})

exec torchrun "${args[@]}" "${extra[@]}" -m hfrl.cli "$@"
