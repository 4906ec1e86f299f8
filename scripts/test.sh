#!/usr/bin/env bash
# Quick start, second command: install the test dependencies and run the whole test suite:
# the MPI tests under `mpiexec -n 4` with pytest-mpi, then the pytest suite (multi-rank tests
# start real gloo processes; its summary line closes the output). Launcher tests skip when
# srun/mpiexec are missing unless HFRL_REQUIRE_LAUNCHERS=1 (CI sets it). Exits non-zero on any
# failure, and when a run collects no tests (pytest's exit code 5). Extra arguments go to the
# main pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh test || exit 1

status=0
# only the files holding MPI tests: collecting the whole suite on 4 ranks costs half a minute
mpi_files=$(grep -rl "mark.mpi" tests --include='test_*.py' | sort)
mpiexec -n 4 python -m pytest --with-mpi -m mpi -p no:cacheprovider $mpi_files || status=$?
if [ "$status" -eq 0 ]; then
  python -m pytest tests "$@" || status=$?
fi
[ "$status" -eq 5 ] && echo "test.sh: pytest collected no tests: failing" >&2
exit "$status"
