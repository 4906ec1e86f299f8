"""The simulator: dataflows, workloads, mappings, and the schedule (colocated stages add, disjoint sets
overlap), checked against totals computed by hand from the cost model's stage times."""
from __future__ import annotations

import pytest

from hfrl.mapping import (DATAFLOWS, GenLayout, Mapping, ModelSpec, RolePlan, TrainLayout, Workload, get_profile,
                          inference_memory, role_memory, schedule, simulate, stage_time, train_memory,
                          transition_time)

A100 = get_profile("a100-80gb")


def test_dataflows_are_hfrl_trainer_steps():
    names = {algo: [s.name for s in stages] for algo, stages in DATAFLOWS.items()}
    assert names["ppo"] == ["gen", "reward", "old_log_prob", "ref", "values", "adv", "update_critic", "update_actor"]
    assert names["grpo"] == ["gen", "reward", "old_log_prob", "ref", "adv", "update_actor"]
    assert names["remax"] == ["gen", "gen_greedy", "reward", "old_log_prob", "ref", "adv", "update_actor"]
    assert names["safe_rlhf"] == ["gen", "reward", "cost", "old_log_prob", "ref", "values", "cost_values", "adv",
                                  "update_critic", "update_cost_critic", "update_actor"]
    for stages in DATAFLOWS.values():
        seen = set()
        for s in stages:  # deps name earlier stages; kinds and roles are known
            assert set(s.deps) <= seen and s.kind in ("generate", "forward", "train", "advantage"), s
            assert s.role in ("actor", "ref", "critic", "reward", "cost"), s
            seen.add(s.name)
        assert len(seen) == len(stages)
    for stages in DATAFLOWS.values():  # the updates read the advantages, which read every preparation
        by_name = {s.name: s for s in stages}
        assert by_name["adv"].role == "actor" and set(by_name["adv"].deps) == {
            s.name for s in stages if s.kind == "forward"} - {"gen_greedy"}
        assert all(s.deps == ("adv",) for s in stages if s.kind == "train")
    by_name = {s.name: s for s in DATAFLOWS["safe_rlhf"]}
    assert by_name["cost_values"].role == by_name["update_cost_critic"].role == "critic"
    assert by_name["update_cost_critic"].model == "cost_critic"
    assert {s.name: s.batch for s in DATAFLOWS["remax"]}["reward"] == 2  # scores the sampled and greedy batches


def test_paper_workload_and_roles():
    w = Workload.paper("safe_rlhf", "13b", "34b")
    assert w.roles == ("actor", "ref", "critic", "reward", "cost")
    assert w.models["actor"] == w.models["ref"] == ModelSpec.from_name("13b")
    value = ModelSpec.from_name("34b").as_value_model()
    assert w.models["critic"] == w.models["reward"] == w.models["cost"] == w.model("cost_critic") == value
    assert (w.prompt_len, w.response_len, w.num_prompts, w.n) == (1024, 1024, 1024, 1)
    # the critic's devices hold the critic and the cost critic, both trained
    layout = TrainLayout(1, 8, 1)
    assert role_memory(w, "critic", layout) == 2 * train_memory(value, layout, seq_len=2048)
    assert role_memory(w, "reward", layout) == inference_memory(value, layout)
    # without a cost_critic entry (as `hfrl plan` builds it) the cost critic has the cost model's shape
    small = ModelSpec.from_name("1.3b").as_value_model()
    models = {r: w.models[r] for r in w.roles} | {"cost": small}
    assert Workload("safe_rlhf", models).model("cost_critic") == small


@pytest.mark.parametrize("kwargs,match", [
    (dict(algorithm="dpo"), "dpo"),
    (dict(algorithm="ppo", models={"actor": ModelSpec.from_name("7b")}), "ref"),
    (dict(algorithm="grpo", prompt_len=0), "prompt_len"),
])
def test_workload_bad_input(kwargs, match):
    spec = ModelSpec.from_name("7b")
    args = dict(algorithm="ppo", models={r: spec for r in ("actor", "ref", "critic", "reward")}) | kwargs
    with pytest.raises(ValueError, match=match):
        Workload(**args)


def _plans(n: int, actor=(1, 4), gen=(1, 2), value=(1, 4)) -> dict[str, RolePlan]:
    def layout(pp, tp):
        return TrainLayout(pp, tp, n // (pp * tp))
    return {"actor": RolePlan("actor", n, layout(*actor), GenLayout(*gen)), "ref": RolePlan("ref", n, layout(*actor)),
            "critic": RolePlan("critic", n, layout(*value)), "reward": RolePlan("reward", n, layout(*value))}


def _times(w: Workload, plans: dict, reserved: int = 0) -> dict[str, float]:
    return {s.name: stage_time(s, w, plans[s.role], A100, reserved_bytes=reserved if s.kind == "generate" else 0)
            for s in w.stages}


def test_colocated_stages_add_up():
    w = Workload.paper("ppo", "7b")
    plans = _plans(16)
    mapping = Mapping((w.roles,), (16,), tuple(plans[r] for r in w.roles))
    others = sum(role_memory(w, r, plans[r].train) for r in ("ref", "critic", "reward"))
    times = _times(w, plans, reserved=others)  # the actor generates beside the others' memory
    trans = transition_time(w.models["actor"], plans["actor"].train, plans["actor"].gen, A100)
    est = simulate(w, mapping, A100)
    assert est.stages == times and est.transition_s == trans > 0
    assert est.total_s == pytest.approx(trans + sum(times.values()), rel=1e-12)
    assert times["gen"] > _times(w, plans)["gen"]  # less KV cache than alone: more waves


def test_disjoint_sets_overlap():
    """{actor,ref} x8 | {critic,reward} x8, by hand: the critic's set starts with the reward model
    once the generation ends; each update waits for the last preparation stage of either set."""
    w = Workload.paper("ppo", "7b")
    plans = _plans(8)
    mapping = Mapping((("actor", "ref"), ("critic", "reward")), (8, 8), tuple(plans[r] for r in w.roles))
    est = simulate(w, mapping, A100)
    t = _times(w, plans, reserved=role_memory(w, "ref", plans["ref"].train))
    assert est.stages == t
    gen_end = est.transition_s + t["gen"]
    ref_end = gen_end + t["old_log_prob"] + t["ref"]        # actor's set: old log-probs, then ref
    values_end = gen_end + t["reward"] + t["values"]        # critic's set: reward, then values
    adv_end = max(ref_end, values_end) + t["adv"]           # on the actor's set, after every preparation
    expected = max(adv_end + t["update_critic"], adv_end + t["update_actor"])
    assert est.total_s == pytest.approx(expected, rel=1e-12)
    busy = [est.transition_s + t["gen"] + t["old_log_prob"] + t["ref"] + t["adv"] + t["update_actor"],
            t["reward"] + t["values"] + t["update_critic"]]
    assert max(busy) <= est.total_s < sum(busy)  # the critic's set works while the actor's does


def test_schedule_rule_with_round_numbers():
    stages = DATAFLOWS["ppo"]
    times = dict(gen=10.0, reward=3.0, old_log_prob=2.0, ref=4.0, values=5.0, adv=1.0, update_critic=7.0,
                 update_actor=6.0)
    one = dict.fromkeys(("actor", "ref", "critic", "reward"), 0)
    assert schedule(stages, one, times, transition_s=1.0) == 39.0
    apart = dict(actor=0, ref=1, critic=2, reward=3)
    # gen ends 11; reward 14, old 13, ref 15, values 16; adv 16 -> 17; update_critic 17 -> 24, update_actor 17 -> 23
    assert schedule(stages, apart, times, transition_s=1.0) == 24.0
    pairs = dict(actor=0, ref=0, critic=1, reward=1)
    # set 0: gen 11, old 13, ref 17; set 1: reward 14, values 19; adv 19 -> 20; updates 27 and 26
    assert schedule(stages, pairs, times, transition_s=1.0) == 27.0


def test_mapping_describe_and_checks():
    w = Workload.paper("ppo", "7b")
    plans = _plans(8, actor=(1, 4), gen=(1, 2), value=(2, 1))
    m = Mapping((("actor", "ref"), ("critic", "reward")), (8, 8), tuple(plans[r] for r in w.roles))
    assert m.describe() == ("{actor,ref}x8 | {critic,reward}x8: actor p1t4d2 gen pg1tg2, ref p1t4d2, "
                            "critic p2t1d4, reward p2t1d4")
    assert m.set_of("critic") == 1 and m.plan("ref") == plans["ref"]
    with pytest.raises(ValueError, match="actor.*its set has 16 devices"):
        Mapping((("actor", "ref"), ("critic", "reward")), (16, 16), tuple(plans[r] for r in w.roles))
    with pytest.raises(ValueError, match="exactly once"):
        Mapping((("actor", "ref"), ("critic",)), (8, 8), tuple(plans[r] for r in w.roles))


def test_simulate_refuses_a_mapping_that_does_not_fit():
    w = Workload.paper("ppo", "13b")
    plans = _plans(4, actor=(1, 4), gen=(1, 4), value=(1, 4))
    mapping = Mapping((w.roles,), (4,), tuple(plans[r] for r in w.roles))
    with pytest.raises(ValueError, match=r"set \{actor,ref,critic,reward\} x4 does not fit"):
        simulate(w, mapping, A100)


def test_workload_batching_reaches_the_cost_model():
    """mini_batch_size / ppo_epochs become optimizer steps of every train stage, micro_batches the
    passes' micro-batches; each stage pays one controller call; bad values are refused."""
    import dataclasses

    from hfrl.mapping import forward_time, train_time

    slow = dataclasses.replace(A100, call_overhead_s=0.5)
    w = Workload.paper("ppo", "7b", num_prompts=64, mini_batch_size=16, ppo_epochs=2, micro_batches=3)
    assert w.optimizer_steps == 8
    plan = RolePlan("actor", 8, TrainLayout(1, 8, 1), GenLayout(1, 8))
    by_name = {s.name: s for s in w.stages}
    expected = train_time(w.models["actor"], plan.train, A100, num_seqs=64, seq_len=2048, num_micro_batches=3,
                          optimizer_steps=8)
    assert stage_time(by_name["update_actor"], w, plan, slow) == pytest.approx(0.5 + expected, rel=1e-12)
    expected = forward_time(w.models["actor"], plan.train, A100, num_seqs=64, seq_len=2048, num_micro_batches=3)
    assert stage_time(by_name["old_log_prob"], w, plan, slow) == pytest.approx(0.5 + expected, rel=1e-12)
    adv = stage_time(by_name["adv"], w, plan, A100)   # elementwise over the batch's tokens: bytes / bandwidth
    assert adv == pytest.approx(64 * 2048 / 8 * 64 / (2.0e12 * 0.8), rel=1e-12)
    assert stage_time(by_name["adv"], w, plan, slow) == pytest.approx(0.5 + adv, rel=1e-12)
    tiny = Workload.paper("ppo", "7b", num_prompts=4, micro_batches=16)   # more micro-batches than rows: clamped
    assert stage_time(by_name["old_log_prob"], tiny, plan, A100) == pytest.approx(
        forward_time(w.models["actor"], plan.train, A100, num_seqs=4, seq_len=2048, num_micro_batches=4), rel=1e-12)
    for bad, match in ((dict(mini_batch_size=3), "divide"), (dict(ppo_epochs=0), "ppo_epochs"),
                       (dict(micro_batches=0), "micro_batches")):
        with pytest.raises(ValueError, match=match):
            Workload.paper("ppo", "7b", num_prompts=64, **bad)


def test_time_shared_cores_by_hand():
    """Two 1-rank sets on one core: stages slow down only while both sets are busy (a waiting rank
    leaves its core); with a core per rank nothing changes."""
    from hfrl.mapping import time_shared

    stages = DATAFLOWS["grpo"]   # gen, reward, old_log_prob, ref, adv, update_actor
    set_of = dict(actor=0, ref=1, reward=1)
    times = dict(gen=10.0, reward=2.0, old_log_prob=4.0, ref=2.0, adv=1.0, update_actor=5.0)
    assert time_shared(stages, set_of, [1, 1], times, cores=2) == times
    shared = time_shared(stages, set_of, [1, 1], times, cores=1)
    # gen alone 0-10; reward, then ref on set 1 beside old_log_prob on set 0: all three doubled
    # (10-14 reward, 10-18 old, 14-18 ref); adv and the update alone again
    assert shared == dict(gen=10.0, reward=4.0, old_log_prob=8.0, ref=4.0, adv=1.0, update_actor=5.0)
    assert schedule(stages, set_of, shared) == 24.0 and schedule(stages, set_of, times) == 20.0
