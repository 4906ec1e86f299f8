"""Failures end the whole job quickly and loudly, under a real launcher (torchrun).

Bounds are wall-clock limits generous enough for a busy 2-core machine; they catch hangs only.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.multiproc import free_port

HANG_BOUND_S = 90

SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    import torch
    import hfrl
    from hfrl.controller import DP_COMPUTE, ONE_TO_ALL, Batch, ResourcePool, Worker, WorkerGroup, register

    MODE = sys.argv[1]

    class Victim(Worker):
        @register(protocol=ONE_TO_ALL)
        def act(self):
            if MODE == "raise" and self.ctx.rank == 2:
                raise KeyError("missing reward column")
            if MODE == "kill" and self.ctx.rank == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            if MODE == "stop" and self.ctx.rank == 2:   # hung, not dead: its connections stay open
                os.kill(os.getpid(), signal.SIGSTOP)
            if MODE.startswith("rank0_share"):   # rank 0 fails before a collective the rest entered
                import torch.distributed as dist
                if self.ctx.rank == 0:
                    raise ValueError("rank 0's own share failed")
                dist.all_reduce(torch.ones(1), group=self.ctx.groups.groups["dp"])
            if MODE == "kill_in_collective":   # rank 3 dies; 0-2 wait for it in an all-reduce
                import torch.distributed as dist
                if self.ctx.rank == 3:
                    time.sleep(0.5)
                    os.kill(os.getpid(), signal.SIGKILL)
                dist.all_reduce(torch.ones(1), group=self.ctx.groups.groups["dp"])
            if MODE == "collective":
                import torch.distributed as dist
                if self.ctx.rank != 3:          # rank 3 never joins: the others wait for it
                    dist.all_reduce(torch.ones(1), group=self.ctx.groups.groups["dp"])
                else:
                    raise RuntimeError("rank 3 failed before the all-reduce")
            return self.ctx.rank

        @register(protocol=ONE_TO_ALL)
        def nap(self, seconds):
            time.sleep(seconds)

    def main():
        group = WorkerGroup(Victim, ResourcePool("all", (0, 1, 2, 3)))
        if MODE == "rank0_share_late":        # rank 1 is still busy with an earlier call
            WorkerGroup(Victim, ResourcePool("one", (1,))).nap(6, blocking=False)
        if MODE == "rank0_dies":
            far = WorkerGroup(Victim, ResourcePool("far", (2, 3)))
            os._exit(3)
        return group.act()

    print("result", hfrl.run(main, timeout_s=float(os.environ.get("HFRL_TIMEOUT", 600))), flush=True)
''')


def launch(tmp_path, mode, timeout_env="600"):
    """Under torchrun (whose agent also stops the other ranks when one fails)."""
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT)
    return subprocess.run(["torchrun", "--nproc-per-node", "4", "--master-port", str(free_port()),
                           str(script), mode], capture_output=True, text=True,
                          timeout=HANG_BOUND_S, env={**os.environ, "HFRL_TIMEOUT": timeout_env})


def launch_plain(tmp_path, mode, timeout_env="600", stopped=()):
    """Four independent processes, no agent: each must end on its own. Returns per-rank
    (exit code, stderr). Ranks in `stopped` stop themselves: they are waited for last, killed."""
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "4",
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "HFRL_TIMEOUT": timeout_env})
             for r in range(4)]
    deadline = time.time() + HANG_BOUND_S
    results = []
    try:
        for rank, p in enumerate(procs):
            if rank not in stopped:
                out, err = p.communicate(timeout=max(deadline - time.time(), 1))
                results.append((p.returncode, out + err))
            else:
                results.append(None)
        for rank in stopped:
            procs[rank].kill()
            out, err = procs[rank].communicate(timeout=30)
            results[rank] = (procs[rank].returncode, out + err)
    finally:
        for p in procs:
            p.kill()
    return results


def test_uncaught_remote_error_exits_every_rank_non_zero(tmp_path):
    out = launch(tmp_path, "raise")
    assert out.returncode != 0
    assert "RemoteError: Victim.act failed on rank 2: KeyError: 'missing reward column'" \
        in out.stderr
    assert "--- remote traceback (rank 2) ---" in out.stderr
    assert "result" not in out.stdout


def test_uncaught_remote_error_without_an_agent(tmp_path):
    results = launch_plain(tmp_path, "raise")
    assert all(code != 0 for code, _ in results), results
    assert "KeyError: 'missing reward column'" in results[0][1]
    for code, text in results[1:]:
        assert "aborting because rank 0 failed" in text


def test_killed_worker_fails_the_job(tmp_path):
    results = launch_plain(tmp_path, "kill")
    assert results[2][0] == -9
    assert all(code != 0 for code, _ in results), results
    assert "WorkerLostError: lost contact with rank 2" in results[0][1]


def test_a_hung_worker_ends_the_job_naming_it(tmp_path):
    # Rank 2 stops (SIGSTOP: alive, connections open, silent) inside a call rank 0 waits on; the
    # control channel would wait for days. Its silence past distributed.timeout_s (10 s here)
    # ends the job, naming it.
    start = time.time()
    results = launch_plain(tmp_path, "stop", timeout_env="10", stopped=(2,))
    assert time.time() - start < 60
    assert results[0][0] != 0 and "rank 2 has sent nothing for over 10 s" in results[0][1], results[0]
    assert "hfrl: aborted: rank 2 hung" in results[0][1]
    for rank in (1, 3):   # told to abort, or seeing rank 0 gone first: either way they end
        assert results[rank][0] != 0 and "rank 0" in results[rank][1], results[rank]


def test_rank_0_dying_leaves_no_rank_behind(tmp_path):
    results = launch_plain(tmp_path, "rank0_dies")
    assert results[0][0] == 3
    for code, text in results[1:]:
        assert code != 0 and "lost contact with rank 0" in text, (code, text)


def launch_failing_fast(tmp_path, mode):
    """launch_plain with the default 600 s collective timeout: every rank must end non-zero
    long before it (within HANG_BOUND_S)."""
    start = time.time()
    results = launch_plain(tmp_path, mode, timeout_env="600")
    assert time.time() - start < HANG_BOUND_S
    assert all(code != 0 for code, _ in results), results
    return results


def test_rank_0_failing_in_its_own_share_ends_the_job_within_seconds(tmp_path):
    # Ranks 1-3 are inside an all-reduce that rank 0 never joins; the collective timeout is
    # 600 s. They must learn of rank 0's failure at once, and rank 0 must show its traceback.
    results = launch_failing_fast(tmp_path, "rank0_share")
    assert "ValueError: rank 0's own share failed" in results[0][1]
    assert 'raise ValueError("rank 0' in results[0][1]           # the traceback
    for code, text in results[1:]:
        assert "rank 0 failed" in text, text


def test_rank_0_failing_ends_the_job_even_for_a_rank_still_in_an_earlier_call(tmp_path):
    # Rank 1 is still in a 6 s call when rank 0's share of the next call fails; when rank 1
    # reaches that call it must not enter it (it would wait for rank 0 for 600 s).
    results = launch_failing_fast(tmp_path, "rank0_share_late")
    assert "ValueError: rank 0's own share failed" in results[0][1]


def test_a_worker_killed_while_others_wait_in_a_collective_ends_the_job(tmp_path):
    # No launcher agent (as under srun/mpirun): rank 3 is SIGKILLed while ranks 0-2 wait for
    # it in an all-reduce whose timeout is 600 s. The job must end within seconds, naming it.
    results = launch_failing_fast(tmp_path, "kill_in_collective")
    assert results[3][0] == -9
    assert "rank 3" in results[0][1] and ("lost" in results[0][1]), results[0][1]


def test_peers_stuck_in_a_collective_end_at_the_timeout(tmp_path):
    # Rank 3 fails before an all-reduce that ranks 0-2 entered: they wait until the collective
    # timeout (5 s here), then every rank ends non-zero with rank 3's error reported.
    results = launch_plain(tmp_path, "collective", timeout_env="5")
    assert all(code != 0 for code, _ in results), results
    assert any("rank 3 failed before the all-reduce" in text for _, text in results)
