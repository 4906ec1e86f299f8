#!/usr/bin/env bash
# Quick start, first command: install what is needed, then run hfrl's main job on its built-in
# default on 2 local ranks: `hfrl train` with no config trains a fresh small model with PPO on the
# built-in max_digit task (a few minutes on 2 CPU cores), printing the reward before and after and
# writing runs/default/ (metrics.jsonl, curves.png, checkpoints, the exported HF model). Extra
# arguments are passed on (a config file first, then section.key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec torchrun --nproc-per-node "${HFRL_NPROC:-2}" --master-port "${MASTER_PORT:-29511}" \
  -m hfrl.cli train "$@"
