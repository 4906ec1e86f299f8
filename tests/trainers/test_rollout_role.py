"""The rollout role (OpenRLHF's placement): generation on a pool of its own with a weight sync.

One 3-rank spawn runs two GRPO jobs of 2 steps: the actor at tp=1 on rank 0 sending to a rollout at
tg=2 on ranks 1-2, and the actor at tp=2 on ranks 0-1 sending to a rollout on rank 2. After each, the
rollout's weights must equal the actor's exactly (fp32) and differ from the starting checkpoint, and
every step must report the bytes the sync moved: what each rollout rank keeps (at tg=2 its TP shards).
The config errors are pure checks (no process).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multiproc import run_ranks
from tests.trainers.test_trainers import _metrics, _weights, assets, job  # noqa: F401 - a fixture


def rollout_job(run_dir: Path, assets: Path, actor_ranks: list[int], rollout_ranks: list[int], *,
                actor_tp: int = 1, tg: int = 1, **overrides):
    pools = {"placement__mode": "custom", "placement__pools": {"train": actor_ranks, "gen": rollout_ranks}}
    roles = {"actor": {"pool": "train", "tp": actor_tp}, "ref": {"pool": "train"},
             "rollout": {"enabled": True, "pool": "gen", "tg": tg}}
    return job(run_dir, assets, "grpo", roles__actor=roles["actor"], roles__ref=roles["ref"],
               roles__rollout=roles["rollout"], trainer__export_hf=True, **pools, **overrides)


def _fit_and_export_rollout(rank, world_size, jobs):
    import hfrl
    from hfrl.trainers import TRAINERS
    from hfrl.trainers.job import check_job

    def main(config):
        trainer = TRAINERS[config.algorithm.name](config)
        summary = trainer.fit()
        trainer.rollout.export_hf(str(Path(config.trainer.run_dir) / "rollout_hf"))
        return summary

    results = {}
    for name, config in jobs:
        check_job(config, world_size)
        summary = hfrl.run(main, config, config=config)
        if rank == 0:
            results[name] = summary
    return results


@pytest.fixture(scope="module")
def rollout_runs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_runs")
    jobs = [("tg2", rollout_job(root / "tg2", assets, [0], [1, 2], tg=2)),
            ("tp2", rollout_job(root / "tp2", assets, [0, 1], [2], actor_tp=2))]
    return root, run_ranks(3, _fit_and_export_rollout, jobs, init=True, timeout=300)[0]


def _param_bytes(folder: Path) -> int:
    """Bytes of the model's distinct parameters (the HF checkpoint leaves a tied head out)."""
    return sum(t.numel() * t.element_size() for t in _weights(folder).values())


def _kept_bytes(folder: Path, tg: int) -> int:
    """Bytes one rollout rank at TP degree tg keeps of the fp32 model: its shard of each TP-split
    tensor (vocab rows padded to a multiple of tg, kv heads copied where tg exceeds them), every
    replicated one whole, a tied head not again."""
    from hfrl.models.config import ModelConfig
    from hfrl.models.weights import param_plan, shard_tensor

    config = ModelConfig.from_pretrained(str(folder))
    total = 0
    for spec in param_plan(config):
        if spec.name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        full = torch.empty(spec.shape, device="meta")
        kept = full if tg == 1 or spec.shard == "replicated" else shard_tensor(spec, full, 0, tg,
                                                                               replicate_kv_heads=True)
        total += kept.numel() * 4
    return total


@pytest.mark.parametrize("name,rollout_ranks", [("tg2", 2), ("tp2", 1)])
def test_rollout_weights_equal_the_actors_after_each_sync(rollout_runs, assets, name, rollout_ranks):
    root, results = rollout_runs
    actor = _weights(root / name / "actor_hf")
    rollout = _weights(root / name / "rollout_hf")
    start = _weights(assets / "policy")
    assert sorted(rollout) == sorted(actor) == sorted(start)
    for key in actor:
        assert actor[key].dtype == torch.float32
        assert torch.equal(rollout[key], actor[key]), key
    changed = [k for k in start if not torch.equal(start[k], actor[k])]
    assert len(changed) >= len(start) // 2, "the actor barely trained: the check would prove nothing"
    # every step sent each rollout rank what it keeps (at tg=2 its TP shards, not the whole model), and said so
    model_bytes = _param_bytes(assets / "policy")
    kept = _kept_bytes(assets / "policy", rollout_ranks if name == "tg2" else 1)
    assert kept == model_bytes if name == "tp2" else kept < 0.7 * model_bytes
    steps = _metrics(root / name)
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert step["rollout/sync_bytes"] == kept * rollout_ranks, (step["rollout/sync_bytes"], kept, model_bytes)
        assert step["timing_s/weight_sync"] > 0
        assert math.isfinite(step["actor/pg_loss"])
    # the rollout's log-probs were computed with the weights the actor held at generation time
    assert steps[-1]["actor/rollout_log_prob_diff/max"] < 1e-4
    # generated rows went from the rollout's ranks to the actor's, not through rank 0's replies
    assert results[name]["transport"]["payload_recv"].get("reply", 0) == 0


def _plan(**roles_and_placement):
    from hfrl.config import Config, from_dict
    from hfrl.distributed.resource_pool import plan_for_config

    config = from_dict(Config, roles_and_placement)
    config.validate()
    return plan_for_config(config, 4)


CUSTOM = {"mode": "custom", "pools": {"a": 2, "r": 2}}
BASE_ROLES = {"actor": {"pool": "a"}, "ref": {"pool": "a"}, "critic": {"pool": "a"}, "reward": {"pool": "a"}}


@pytest.mark.parametrize("placement,rollout,message", [
    ({"mode": "colocate"}, {}, "would put the rollout on the actor's ranks"),
    ({"mode": "split"}, {}, "placement.mode=standalone or custom"),
    (CUSTOM, {"pool": "a"}, "roles.rollout.pool='a' is the actor's pool: to generate on the actor's own ranks "
                            "use the hybrid engine instead"),
    (CUSTOM, {"pool": "r", "pp": 2}, "roles.rollout.pp=2: the rollout generates in one pipeline stage"),
    (CUSTOM, {"pool": "r", "tp": 2, "tg": 1}, "roles.rollout.tp=2 and roles.rollout.tg=1"),
    (CUSTOM, {"pool": "r", "tg": 3}, "roles.rollout.tg=3 does not divide the rollout's pool 'r' of 2 ranks"),
    (CUSTOM, {"pool": "r", "engine": {"dtype": "bfloat16"}}, "set them under roles.actor.engine"),
])
def test_rollout_config_errors_name_the_value_and_the_fix(placement, rollout, message):
    roles = {name: dict(cfg) for name, cfg in BASE_ROLES.items()} if placement is CUSTOM else {}
    roles["rollout"] = {"enabled": True, **rollout}
    with pytest.raises(ValueError) as err:
        _plan(placement=placement, roles=roles)
    assert message in str(err.value)


def test_rollout_refuses_the_hybrid_engines_settings():
    roles = {**BASE_ROLES, "rollout": {"enabled": True, "pool": "r"}}
    with pytest.raises(ValueError, match=r"hybrid.mode='ds_chat' sets up the actor's own generation"):
        _plan(placement=CUSTOM, roles=roles, hybrid={"mode": "ds_chat"})
    with pytest.raises(ValueError, match=r"roles.actor.tg=1 sets up the actor's own generation"):
        _plan(placement=CUSTOM, roles={**roles, "actor": {"pool": "a", "tg": 1}})


def test_rollout_plan_and_sync_groups():
    """standalone: one pool per role, the rollout last; one sync group per actor stage."""
    plan = _plan(placement={"mode": "standalone", "pools": {"actor": 2, "ref": 1, "rollout": 1}},
                 roles={"critic": {"enabled": False}, "reward": {"enabled": False},
                        "actor": {"pp": 2}, "rollout": {"enabled": True}})
    assert plan.role("rollout").pool.ranks == (3,)
    assert plan.weight_sync_groups() == ((0, 3), (1, 3))
    assert plan.to_dict()["weight_sync"] == [[0, 3], [1, 3]]
    custom = _plan(placement=CUSTOM, roles={**BASE_ROLES, "rollout": {"enabled": True, "pool": "r", "tg": 2}})
    assert custom.role("rollout").dims.tp == 2 and custom.weight_sync_groups() == ((0, 2, 3),)
    assert "weight_sync" not in _plan(roles={"critic": {"enabled": False}}).to_dict()


def test_rollout_tg_must_split_the_model(assets, tmp_path):
    from hfrl.trainers.job import check_job

    config = rollout_job(tmp_path, assets, [0], [1, 2, 3], tg=3)
    with pytest.raises(ValueError, match=r"roles.rollout.tg=3 cannot split the actor's model"):
        check_job(config, 4)
