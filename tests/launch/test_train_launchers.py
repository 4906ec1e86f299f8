"""`hfrl train` under each real launcher: 2 ranks, the built-in job cut to one small step.

Rank 0 prints the run's summary and writes the run directory; the other rank stays quiet. The
launcher helpers (skips, clean environment, timeouts) are test_launchers.py's.
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.launch.test_launchers import _need, _need_slurm, mpi_flavour, run

TRAIN = ["-m", "hfrl.cli", "train", "data.train_batch_size=8", "algorithm.mini_batch_size=4",
         "trainer.total_steps=1", "trainer.eval_every=0", "trainer.export_hf=false", "data.val_size=8",
         "data.task_train_size=64", "trainer.progress_bar=false"]


def _check(result, run_dir) -> None:
    assert result.stdout.count("hfrl train: ppo finished at step 1") == 1, result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["perf/throughput"] > 0
    assert (run_dir / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()


@pytest.mark.parametrize("launcher", ["none", "mpiexec", "srun"])
def test_train_under_launcher(launcher, tmp_path):
    """none: plain `hfrl train`, which starts its 2 local ranks under torchrun itself."""
    args = [*TRAIN, f"trainer.run_dir={tmp_path}"]
    if launcher == "none":
        _need("torchrun")
        cmd = [sys.executable, *args]
    elif launcher == "mpiexec":
        mpiexec = _need("mpiexec")
        flags = ["--oversubscribe", "--allow-run-as-root"] if mpi_flavour(mpiexec) == "openmpi" else []
        cmd = [mpiexec, "-n", "2", *flags, sys.executable, *args]
    else:
        _need_slurm()
        cmd = ["srun", "-n", "2", "--overcommit", "--kill-on-bad-exit=1", sys.executable, *args]
    _check(run(cmd, timeout=180), tmp_path)
