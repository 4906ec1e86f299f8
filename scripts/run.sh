#!/usr/bin/env bash
# Quick start, first command: install what is needed, then run hfrl's main job on its built-in
# default on 2 local ranks. Until the RL trainer lands, the main job is the layout check: every
# rank builds the placement plan and every process group, checks each group with an all-reduce,
# and rank 0 prints the plan. Extra arguments are passed on (config file, section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec torchrun --nproc-per-node "${HFRL_NPROC:-2}" --master-port "${MASTER_PORT:-29511}" \
  -m hfrl.cli layout roles.actor.tp=2 roles.actor.tg=1 "$@"
