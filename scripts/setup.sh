#!/usr/bin/env bash
# Idempotent environment setup, sourced by scripts/run.sh and scripts/test.sh.
#
#   source scripts/setup.sh [test]
#
# Creates .venv (with the system's site-packages visible, so an existing torch is reused rather
# than downloaded again), installs torch only if none is importable -- the CPU-sized 2.13.0 where
# no NVIDIA GPU is present, the default CUDA build where one is -- then hfrl in editable mode.
# With "test", also the test extra (pytest, pytest-mpi, pytest-timeout, hypothesis, mpi4py and
# pip's MPICH). Set PIP_INDEX_URL / PIP_EXTRA_INDEX_URL as usual to
# choose where pip downloads from (e.g. PyTorch's CPU wheel index on machines outside this setup).
set -euo pipefail
HFRL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HFRL_VENV="${HFRL_VENV:-$HFRL_ROOT/.venv}"
HFRL_TORCH_CPU="${HFRL_TORCH_CPU:-torch==2.13.0}"
HFRL_TRITON_CPU="${HFRL_TRITON_CPU:-triton==3.8.0}"
_extra="${1:-}"

_python="${PYTHON:-$(command -v python3 || command -v python)}"
if [ ! -x "$HFRL_VENV/bin/python" ]; then
  "$_python" -m venv --system-site-packages "$HFRL_VENV" || {
    echo "setup: could not create a virtual environment with $_python -m venv" \
         "(on Debian/Ubuntu: apt-get install python3-venv)" >&2; return 1 2>/dev/null || exit 1; }
fi
# shellcheck disable=SC1091
source "$HFRL_VENV/bin/activate"
_pip() { python -m pip install --disable-pip-version-check -q "$@"; }

_has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! python -c "import torch" >/dev/null 2>&1; then
  if _has_gpu; then _pip torch; else _pip "$HFRL_TORCH_CPU"; fi
fi
# The stamp skips pip entirely when nothing changed since the last install (seconds saved per run).
_stamp="$HFRL_VENV/.hfrl-installed-${_extra:-base}"
if [ ! -f "$_stamp" ] || [ "$HFRL_ROOT/setup.py" -nt "$_stamp" ]; then
  # triton (a dependency where it has wheels): without a GPU, the version this machine already
  # holds rather than the newest, a 300 MB download; on a GPU, whatever torch wants.
  if ! python -c "import triton" >/dev/null 2>&1 && [ "$(uname -s)" = Linux ] && ! _has_gpu; then
    _pip "$HFRL_TRITON_CPU" || echo "setup: $HFRL_TRITON_CPU unavailable; pip picks a triton" >&2
  fi
  if [ "$_extra" = "test" ]; then
    _pip -e "$HFRL_ROOT[test]"
  else
    _pip -e "$HFRL_ROOT"
  fi
  touch "$_stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
