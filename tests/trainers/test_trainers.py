"""Every trainer end to end on real processes (gloo): short runs of each algorithm, a PPO run whose
reward must rise, resume equality, placements on 4 ranks, and a failing reward function.

Runs are grouped so each spawn pays its start-up once: one 2-rank spawn runs every trainer, the
resume runs and the learning run one after another in the same processes (each its own hfrl.run).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multiproc import run_ranks

ALGORITHMS = ("ppo", "grpo", "rloo", "remax", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
              "safe_rlhf")
TIMING = ("timing_s/", "perf/throughput", "hybrid/timing")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from examples.make_example_assets import write_models, write_prompts

    out = tmp_path_factory.mktemp("assets")
    write_models(out)
    write_prompts(out)
    return out


def job(run_dir: Path, assets: Path, algorithm: str, **overrides):
    """A tiny job on the example assets: 4 prompts x n responses, 4 new tokens, 2 steps."""
    from hfrl.config import Config, from_dict

    n = 1 if algorithm in ("ppo", "remax", "safe_rlhf") else 2
    data = {
        "engine": {"model_path": str(assets / "policy"), "optim": {"lr": 1e-3, "weight_decay": 0.0}},
        "data": {"train_files": [str(assets / "add_train.jsonl")], "max_prompt_length": 16,
                 "train_batch_size": 4, "reward_fn": "tests.trainers.rewards:digits"},
        "roles": {"critic": {"enabled": algorithm in ("ppo", "safe_rlhf")}, "reward": {"enabled": False}},
        "rollout": {"n": n, "max_new_tokens": 4, "kv_cache_bytes": 1 << 22},
        "algorithm": {"name": algorithm, "mini_batch_size": 2, "kl_coef": 0.01},
        "trainer": {"total_steps": 2, "run_dir": str(run_dir), "progress_bar": False, "export_hf": False},
    }
    if algorithm == "safe_rlhf":
        data["data"].pop("reward_fn")
        data["roles"].update({"reward": {"engine": {"model_path": str(assets / "reward")}},
                              "critic": {"engine": {"model_path": str(assets / "reward")}},
                              "cost": {"enabled": True, "engine": {"model_path": str(assets / "cost")}}})
    for key, value in overrides.items():
        section, name = key.split("__")
        current = data.setdefault(section, {}).get(name)
        data[section][name] = {**current, **value} if isinstance(current, dict) else value
    config = from_dict(Config, data)
    config.validate(training=True)
    return config


def _run_jobs(rank, world_size, jobs):
    import sys

    import hfrl
    from hfrl.trainers import run_trainer
    from hfrl.trainers.job import check_job

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # examples.reward_fns
    results = {}
    for name, config in jobs:
        check_job(config, world_size)
        summary = hfrl.run(run_trainer, config, config=config)
        if rank == 0:
            results[name] = summary
    return results


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def two_rank_runs(assets, tmp_path_factory):
    """One 2-rank spawn: every trainer for 2 steps; PPO stopped after 2 steps and resumed to 4 next
    to an uninterrupted 4-step run; the default job (fresh model, built-in task) long enough to learn."""
    from hfrl.trainers.job import default_config

    root = tmp_path_factory.mktemp("runs")
    (root / "grpo").mkdir()   # an earlier run left metrics but no checkpoint: kept aside, not wiped
    (root / "grpo" / "metrics.jsonl").write_text(EARLIER_METRICS)
    jobs = [(algo, job(root / algo, assets, algo)) for algo in ALGORITHMS]
    adaptive = dict(algorithm__kl_ctrl="adaptive", algorithm__kl_target=0.01, algorithm__kl_horizon=20)
    jobs.append(("full", job(root / "full", assets, "ppo", trainer__total_steps=4, **adaptive)))
    jobs.append(("part", job(root / "resumed", assets, "ppo", trainer__total_steps=2, **adaptive)))
    jobs.append(("rest", job(root / "resumed", assets, "ppo", trainer__total_steps=4, **adaptive)))
    learn = default_config([f"trainer.run_dir={root / 'learn'}", "trainer.progress_bar=false",
                            "trainer.total_steps=40", "trainer.eval_every=40", "trainer.save_every=0"])
    jobs.append(("learn", learn))
    results = run_ranks(2, _run_jobs, jobs, init=True, timeout=600)[0]
    return root, results


EARLIER_METRICS = json.dumps({"step": 1, "critic/score/mean": 0.25}) + "\n"


def test_an_earlier_runs_metrics_are_set_aside_when_a_run_starts_at_step_0(two_rank_runs):
    root, _ = two_rank_runs
    assert (root / "grpo" / "metrics.previous.jsonl").read_text() == EARLIER_METRICS
    assert [row["step"] for row in _metrics(root / "grpo")] == [1, 2]   # this run's own steps only


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_trainer_runs_and_updates_the_actor(two_rank_runs, assets, algorithm):
    root, results = two_rank_runs
    last = results[algorithm]["last"]
    assert last["step"] == 2
    for key in ("actor/pg_loss", "actor/grad_norm", "critic/score/mean", "perf/throughput"):
        assert math.isfinite(last[key]), (key, last[key])
    if algorithm in ("ppo", "safe_rlhf"):
        assert math.isfinite(last["critic/vf_loss"])
    if algorithm == "safe_rlhf":
        assert math.isfinite(last["cost_critic/vf_loss"]) and last["safe_rlhf/lagrange"] >= 0
    # the generation engine's log-probs are the training engine's (same weights, fp32)
    assert last["actor/rollout_log_prob_diff/max"] < 1e-4
    before = _weights(assets / "policy")
    after = _weights(Path(results[algorithm]["checkpoint"]) / "actor" / "model")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"only {changed} of {sorted(before)} changed"


def test_no_rows_pass_through_rank_0(two_rank_runs):
    """Colocated roles on one layout: every stage finds its rows where the previous one left them;
    rank 0 receives metrics, never rollout tensors (the transport counters prove it)."""
    _, results = two_rank_runs
    for algorithm in ALGORITHMS:
        stats = results[algorithm]["transport"]
        assert stats["payload_recv"].get("reply", 0) == 0, (algorithm, stats)
        assert stats["payload_recv"].get("data", 0) == 0, (algorithm, stats)


def test_resume_repeats_the_uninterrupted_run(two_rank_runs):
    root, results = two_rank_runs
    assert results["rest"]["start_step"] == 2
    full, resumed = _metrics(root / "full"), _metrics(root / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    coefs = [r["actor/kl_coef"] for r in full]
    assert len(set(coefs)) == 4, f"the adaptive KL coefficient should move every step: {coefs}"
    for a, b in zip(full, resumed):
        same = {k: a[k] for k in a if not k.startswith(TIMING)}
        assert same == {k: b[k] for k in same}, f"step {a['step']} differs after resuming"


def test_default_job_learns(two_rank_runs):
    """PPO on the built-in task from a fresh model: the greedy validation reward rises."""
    _, results = two_rank_runs
    before = results["learn"]["val_before"]["val/score/mean"]
    after = results["learn"]["last"]["val/score/mean"]
    assert after > before + 0.2, (before, after)
    assert Path(results["learn"]["plot"]).is_file()
    export = Path(results["learn"]["export"])
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()


def _failing_run(rank, world_size, config):
    import hfrl
    from hfrl.trainers import run_trainer

    try:
        hfrl.run(run_trainer, config, config=config)
    except SystemExit as exit_:
        return f"SystemExit({exit_.code})"
    except Exception as err:  # noqa: BLE001 - the test reads the message
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_a_reward_function_that_raises_stops_every_rank(assets, tmp_path):
    """The error names the function and the sample; rank 1 (scoring its own rows) ends too."""
    config = job(tmp_path / "bad", assets, "grpo", data__reward_fn="tests.trainers.rewards:raises")
    outcome = run_ranks(2, _failing_run, config, timeout=120)
    assert "RewardFunctionError" in outcome[0] and "NameError" not in outcome[0], outcome
    assert "tests.trainers.rewards:raises" in outcome[0] and "of dataset row" in outcome[0], outcome
    assert "cannot grade" in outcome[0]
    assert outcome[1] == "SystemExit(1)", outcome


def _four_rank_jobs(rank, world_size, jobs):
    return _run_jobs(rank, world_size, jobs)


def test_colocate_and_split_placements_on_4_ranks(assets, tmp_path):
    """PPO colocated with the actor at tp=2 generating at tg=1 (the hybrid engine regroups), and
    split: actor + reference on ranks 0-1, critic on 2-3 (rows cross pools, never via rank 0)."""
    four = dict(data__train_batch_size=8, algorithm__mini_batch_size=4)
    colocate = job(tmp_path / "colocate", assets, "ppo", roles__actor={"tp": 2, "tg": 1}, **four)
    split = job(tmp_path / "split", assets, "ppo", placement__mode="split", **four)
    results = run_ranks(4, _four_rank_jobs, [("colocate", colocate), ("split", split)], init=True, timeout=300)[0]
    for name in ("colocate", "split"):
        last = results[name]["last"]
        assert math.isfinite(last["actor/pg_loss"]) and math.isfinite(last["critic/vf_loss"]), (name, last)
        assert last["actor/rollout_log_prob_diff/max"] < 1e-4, (name, last)
        assert results[name]["transport"]["payload_recv"].get("reply", 0) == 0, (name, results[name]["transport"])
    # split: the critic's pool got its rows straight from the actor's ranks (rank 0 sent its share)
    assert results["split"]["transport"]["payload_sent"].get("data", 0) > 0
