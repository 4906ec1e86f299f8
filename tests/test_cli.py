"""`hfrl` command line: dry runs, a world of one, and config errors on every rank."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.multiproc import free_port

HANG_BOUND_S = 120   # generous: only catches hangs


def hfrl(*args, launcher=(), env=None):
    cmd = [*launcher, *([sys.executable] if not launcher else []), "-m", "hfrl.cli", *args]
    if launcher and launcher[0] == "torchrun":
        cmd = [*launcher, "-m", "hfrl.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_BOUND_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun(n):
    return ("torchrun", "--nproc-per-node", str(n), "--master-port", str(free_port()))


def test_dry_run_of_a_1024_rank_plan():
    out = hfrl("layout", "--world-size", "1024", "--json", "placement.mode=split",
               "roles.actor.tp=8", "roles.actor.pp=4", "roles.actor.tg=2", "roles.actor.pg=1")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["world_size"] == 1024 and report["launcher"] == "none"
    actor = report["plan"]["roles"]["actor"]
    assert actor["layout"] == {"pp": 4, "tp": 8, "dp": 16, "pg": 1, "tg": 2, "dg": 16,
                               "grouping": "hybridflow"}
    assert len(actor["groups"]["micro_dp"]) == 512 // 16
    assert actor["groups"]["gen_tp"][0] == [0, 4]        # stride tp/tg = 4
    assert report["plan"]["pools"]["critic"][0] == 512


def test_world_of_one_without_launcher():
    out = hfrl("layout", "--json", "--compact")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["world_size"], report["launcher"], report["backend"]) == (1, "none", "gloo")
    assert report["groups_checked"] > 0


def test_human_readable_layout():
    out = hfrl("layout", "--world-size", "64", "roles.actor.tp=2")
    assert "... (+16 more)" in out.stdout                      # 32 TP groups, 16 shown
    every = hfrl("layout", "--world-size", "64", "roles.actor.tp=2", "--all-groups")
    assert "[62,63]" in every.stdout and "more)" not in every.stdout
    out = hfrl("layout", "--world-size", "8", "roles.actor.tp=4", "roles.actor.tg=2")
    assert out.returncode == 0, out.stderr
    assert "gen_tp       4 x 2    [0,2] [1,3] [4,6] [5,7]" in out.stdout
    assert "micro_dp     4 x 2    [0,1] [2,3] [4,5] [6,7]" in out.stdout


@pytest.mark.parametrize("overrides,match", [
    (["roles.actor.tp=3"], "pp=1 x tp=3 = 3 does not divide the pool of 2 ranks"),
    (["distributed.world_size=8"], "distributed.world_size=8 but 2 ranks were launched"),
    (["roles.actor.tp=2", "roles.actor.tg=4"], "tg=4 must divide training tp=2"),
    (["roles.actr.tp=2"], "did you mean 'roles.actor'"),
    (["roles.actor.tp=x"], "expected int, got str 'x'"),
    (["placement.mode=split", "placement.pools={actor: 1, critic: 2}"],
     "rank 2, outside the world of 2"),
])
def test_config_errors_fail_fast_on_every_rank(overrides, match):
    out = hfrl("layout", *overrides, launcher=torchrun(2))
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"hfrl layout: error (rank {rank}/2): " in out.stderr, out.stderr
    assert out.stderr.count(match) == 2, out.stderr
    assert "hfrl/config.py" not in out.stderr and "hfrl/distributed" not in out.stderr  # no trace


def test_config_command(tmp_path):
    described = hfrl("config", "--describe")
    assert described.returncode == 0
    assert "roles.actor.tg (int | None, default None)" in described.stdout
    path = tmp_path / "job.yaml"
    path.write_text("roles: {actor: {tp: 2}}\n")
    resolved = hfrl("config", str(path), "placement.mode=split")
    assert resolved.returncode == 0, resolved.stderr
    data = yaml.safe_load(resolved.stdout)
    assert data["roles"]["actor"]["tp"] == 2 and data["placement"]["mode"] == "split"
    bad = hfrl("config", str(path), "oops")
    assert bad.returncode == 2 and "only the first argument may be a config file" in bad.stderr
