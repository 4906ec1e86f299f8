"""`hfrl` command line: dry runs, a world of one, and config errors on every rank."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.multiproc import free_port

HANG_BOUND_S = 120   # generous: only catches hangs
# Each `hfrl` call is one process, mostly importing torch on one core: independent calls of a test
# run side by side, one per core (at least 2, at most 4).
WORKERS = max(2, min(os.cpu_count() or 1, 4))


def hfrl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hfrl.cli", *args], capture_output=True, text=True,
                          timeout=HANG_BOUND_S, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def hfrl_all(*calls):
    """``hfrl(*args)`` for each tuple of args, WORKERS at a time; the results in call order."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda args: hfrl(*args), calls))


def launched(num_ranks, *args):
    """``hfrl *args`` on num_ranks processes started side by side with the variables torchrun sets;
    one CompletedProcess per rank. Unlike torchrun, no agent stops the other ranks when the first
    one fails, so each rank's own error line is always there to check."""
    cmd = [sys.executable, "-m", "hfrl.cli", *args]
    common = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(num_ranks),
              "LOCAL_WORLD_SIZE": str(num_ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(num_ranks)]
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=HANG_BOUND_S)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


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
    first16, every, out = hfrl_all(("layout", "--world-size", "64", "roles.actor.tp=2"),
                                   ("layout", "--world-size", "64", "roles.actor.tp=2", "--all-groups"),
                                   ("layout", "--world-size", "8", "roles.actor.tp=4", "roles.actor.tg=2"))
    assert "... (+16 more)" in first16.stdout                  # 32 TP groups, 16 shown
    assert "[62,63]" in every.stdout and "more)" not in every.stdout
    assert out.returncode == 0, out.stderr
    assert "gen_tp       4 x 2    [0,2] [1,3] [4,6] [5,7]" in out.stdout
    assert "micro_dp     4 x 2    [0,1] [2,3] [4,5] [6,7]" in out.stdout
    # Table 2 at pp=1 tp=4 dp=2 -> tg=2: each micro-DP pair gathers the other half of its shard
    assert "  hybridflow   receive 1/4 M, hold 1/2 M, stored twice 0 M" in out.stdout
    assert "  hybridflow_v receive 3/4 M, hold 1 M, stored twice 1/4 M" in out.stdout
    assert "  ds_chat      receive 7/8 M, hold 1 M, stored twice 1/8 M" in out.stdout


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
    for rank, out in enumerate(launched(2, "layout", *overrides)):
        assert out.returncode == 2, (rank, out.returncode, out.stderr)
        assert f"hfrl layout: error (rank {rank}/2): " in out.stderr, out.stderr
        assert out.stderr.count(match) == 1, out.stderr
        assert "hfrl/config.py" not in out.stderr and "hfrl/distributed" not in out.stderr  # no trace


def test_config_command(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("roles: {actor: {tp: 2}}\n")
    described, resolved, bad = hfrl_all(("config", "--describe"), ("config", str(path), "placement.mode=split"),
                                        ("config", str(path), "oops"))
    assert described.returncode == 0
    assert "roles.actor.tg (int | None, default None)" in described.stdout
    assert resolved.returncode == 0, resolved.stderr
    data = yaml.safe_load(resolved.stdout)
    assert data["roles"]["actor"]["tp"] == 2 and data["placement"]["mode"] == "split"
    assert bad.returncode == 2 and "only the first argument may be a config file" in bad.stderr


# ---- item 10: the dry run and the launched run reject the same inputs with the same line ------

def _error_line(out, command="layout"):
    """The single stderr line of a configuration error, without the rank prefix."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hfrl {command}: error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("override,match", [
    ("distributed.timeout_s=-1", "distributed.timeout_s=-1.0 "),
    ("distributed.timeout_s=1e400", "distributed.timeout_s=inf "),
    ("distributed.timeout_s=nan", "distributed.timeout_s=nan "),
    pytest.param("distributed.backend=mpi", "distributed.backend='mpi'", id="backend-mpi-run"),
])
def test_dry_run_and_launched_run_reject_the_same_values(override, match):
    dry, launched = hfrl_all(("layout", "--world-size", "2", override),
                             ("layout", override))             # a world of one, no launcher
    dry, launched = _error_line(dry), _error_line(launched)
    assert dry == launched and match in dry, (dry, launched)


def test_bad_files_and_arguments_name_the_input(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("roles:\n\tactor: {tp: 2}\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("roles: {actor: {tp: 2}}\nroles: {critic: {tp: 2}}\n")
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("roles: !!python/object/apply:os.system ['true']\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"roles: {actor: {pool: caf\xe9}}\n")
    cases = [(str(bad_yaml), f"{bad_yaml}:2:1:"), (str(dup), f"{dup}:2:1: duplicate key 'roles'"),
             (str(unsafe), f"{unsafe}:1:8:"), (str(latin), f"{latin}:1:26: not UTF-8"),
             (str(tmp_path), f"config file '{tmp_path}' is a directory"),
             ("", "config file path is empty")]
    *outs, config_out = hfrl_all(*[("layout", "--world-size", "2", arg) for arg, _ in cases],
                                 ("config", str(tmp_path)))
    for (arg, match), out in zip(cases, outs):
        line = _error_line(out)
        assert match in line, (arg, line)
    assert "is a directory" in _error_line(config_out, "config")


@pytest.mark.timeout(60)   # only a hang-catcher; the assertions are on the content
def test_dry_run_of_100000_ranks_plans_in_seconds():
    out = hfrl("layout", "--world-size", "100000", "placement.mode=split", "roles.actor.tp=8",
               "roles.actor.pp=5", "roles.actor.tg=2", "roles.actor.pg=1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("world size 100000 | launcher none | backend fake (dry run) | "
                               "placement split | ")
    assert "  actor    50000 ranks [0..49999]     roles: actor, ref" in lines
    assert "  critic   50000 ranks [50000..99999] roles: critic, reward" in lines
    assert ("actor on 'actor': train pp=5 tp=8 dp=1250 | generate pg=1 tg=2 dg=20 (hybridflow)"
            in lines)
    assert any(line.startswith("  gen_tp    25000 x 2    [0,4] [1,5] [2,6] [3,7] [8,12]")
               for line in lines), out.stdout
    assert any(line.startswith("  dp          40 x 1250 [0,8,..,9992] [1,9,..,9993]")
               for line in lines), out.stdout
    assert any(line.startswith("  dp           1 x 50000 [50000,50001,..,99999]")
               for line in lines), out.stdout
    assert len(lines) < 60 and max(map(len, lines)) < 1000    # output stays readable


@pytest.mark.timeout(60)   # hang-catcher: before the fix this took 210 s
def test_dry_run_of_100000_colocated_ranks():
    # The default placement: four roles on one pool, 100000 distinct size-1 groups per axis.
    out = hfrl("layout", "--world-size", "100000", "--json", "--compact")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["num_process_groups"] == 100001          # 100000 singletons + one DP group
    roles = report["plan"]["roles"]
    assert list(roles) == ["actor", "critic", "ref", "reward"]
    for info in roles.values():
        assert info["groups"]["dp"] == [list(range(100000))]
        assert info["groups"]["tp"][99999] == [99999] and len(info["groups"]["gen_mp"]) == 100000


def test_absurd_world_sizes_are_refused_with_a_message():
    huge, zero = hfrl_all(("layout", "--world-size", "1000000000"), ("layout", "--world-size", "0"))
    line = _error_line(huge)
    assert "--world-size 1000000000" in line and "at most 1048576" in line, line
    line = _error_line(zero)
    assert "--world-size 0 must be >= 1" in line, line


def test_describe_lists_every_trainer_setting():
    out, resolved = hfrl_all(("config", "--describe"),
                             ("config", "roles.critic.engine.optim.lr=5e-6", "engine.model_path=/m"))
    assert out.returncode == 0, out.stderr
    for line in ("  engine.model_path (str, default ''): Local HF checkpoint folder",
                 "  engine.optim.lr (float, default 1e-06): Peak learning rate",
                 "  rollout.top_p (float, default 1.0):", "  algorithm.kl_coef (float, default",
                 "  trainer.total_steps (int, default 100):",
                 "  roles.critic.engine (dict[str, Any], default {}): This role's overrides"):
        assert line in out.stdout, line
    data = yaml.safe_load(resolved.stdout)
    assert data["engine"]["model_path"] == "/m" and data["engine"]["optim"]["lr"] == 1e-6
    assert data["roles"]["critic"]["engine"] == {"optim": {"lr": 5e-6}}


@pytest.mark.parametrize("count,message", [("0", "0 ranks: give 1 or more"), ("-4", "-4 ranks: give 1 or more"),
                                           ("two", "'two' is not an integer")])
def test_train_refuses_a_rank_count_below_one(capsys, count, message):
    """--nproc-per-node 0 once ran silently as one in-process rank with exit code 0."""
    from hfrl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc-per-node", count])
    assert exit_info.value.code == 2
    assert f"argument --nproc-per-node: {message}" in capsys.readouterr().err


def test_a_failure_inside_the_run_ends_every_rank_cleanly(tmp_path):
    """A reward function raising on rank 1 mid-run: rank 0 prints the traceback and one line naming
    the error, and exits 1 first; rank 1 follows. Before, the teardown under threads still blocked in
    gloo receives aborted rank 0 (SIGABRT, "terminate called without an active exception"), and a
    launcher named the wrong rank as the root cause."""
    import time

    reward = tmp_path / "reward.py"
    reward.write_text("def raises(prompt, response, ground_truth):\n    raise RuntimeError('boom in user reward')\n")
    start = time.monotonic()
    rank0, rank1 = launched(2, "train", "--resume", "trainer.total_steps=1", "trainer.progress_bar=false",
                            f"trainer.run_dir={tmp_path / 'run'}", f"data.reward_fn={reward}:raises")
    assert time.monotonic() - start < HANG_BOUND_S
    # an explicit --resume with nothing to resume says so, once
    notice = f"hfrl train: --resume: {tmp_path / 'run'} holds no complete checkpoint yet; starting at step 0"
    assert notice in rank0.stdout.splitlines() and "--resume" not in rank1.stdout, rank0.stdout[-2000:]
    assert rank0.returncode == 1 and rank1.returncode == 1, (rank0.stderr[-2000:], rank1.stderr[-2000:])
    for rank in (rank0, rank1):
        assert "terminate called" not in rank.stderr
    line = next(x for x in rank0.stderr.splitlines() if x.startswith("hfrl train: error"))
    # each rank scores its own samples: rank 0's error, or rank 1's passed on, whichever came first
    assert re.fullmatch(r"hfrl train: error \(rank 0/2\): (RemoteError: rule_reward.score failed on rank 1: )?"
                        r"RewardFunctionError: reward function '.*reward.py:raises' raised on .*"
                        r"RuntimeError: boom in user reward", line), line
    assert rank0.stderr.count("Traceback (most recent call last)") >= 1
    assert "rank 1: aborting because rank 0 failed" in rank1.stderr
