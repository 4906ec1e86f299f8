"""The placement + parallelism search: partitions, allocations, minimal allocations, Algorithm 2, the
search against the brute force, memory feasibility, bad input, and the paper's placement findings."""
from __future__ import annotations

import itertools

import pytest

from hfrl.mapping import (Planner, Workload, allocations, auto_parallel, brute_force, device_counts, get_profile,
                          inference_memory, min_allocation, role_memory, search, set_partitions, stage_time,
                          train_memory)
from hfrl.mapping.cost_model import gen_layouts, max_concurrent_seqs, train_layouts, transition_time

A100 = get_profile("a100-80gb")
Q = A100.memory_bytes


@pytest.mark.parametrize("k,bell", [(1, 1), (2, 2), (3, 5), (4, 15), (5, 52)])
def test_set_partitions_bell_numbers(k, bell):
    items = "abcde"[:k]
    parts = list(set_partitions(items))
    assert len(parts) == bell
    assert len({frozenset(frozenset(b) for b in p) for p in parts}) == bell  # no duplicates
    for p in parts:
        assert sorted(x for b in p for x in b) == list(items)
        firsts = [items.index(b[0]) for b in p]
        assert firsts == sorted(firsts) and all(list(b) == sorted(b, key=items.index) for b in p)  # canonical


def test_device_counts_and_allocations():
    assert device_counts(40, A100) == [1, 2, 4, 8, 16, 24, 32, 40]
    valid = device_counts(32, A100)
    for minimums in ([1, 1], [1, 2, 4], [8, 1, 1], [4, 4, 4, 4], [2, 30]):
        got = list(allocations(32, minimums, A100))
        expected = [a for a in itertools.product(valid, repeat=len(minimums))
                    if sum(a) == 32 and all(x >= m for x, m in zip(a, minimums))]
        assert sorted(got) == sorted(expected) and len(set(got)) == len(got)
    assert (24, 4, 4) in allocations(32, [1, 2, 4], A100) and (16, 8, 8) in allocations(32, [1, 2, 4], A100)
    assert list(allocations(32, [2, 30], A100)) == [] and list(allocations(4, [1, 1, 1], A100)) == [(1, 1, 2),
                                                                                                      (1, 2, 1),
                                                                                                      (2, 1, 1)]


def _fits(w: Workload, roles, n: int) -> bool:
    """Independently of the Planner: the roles' least memories on n devices add up to a device, and the
    actor (if there) has a layout that trains and generates beside the others' least memories."""
    def least(role):
        specs = [spec for spec, _ in w.role_models(role)]
        layouts = [t for t in train_layouts(specs[0], n, A100) if all(t in train_layouts(s, n, A100) for s in specs)]
        return min((role_memory(w, role, t) for t in layouts), default=float("inf"))
    others = sum(least(r) for r in roles if r != "actor")
    if "actor" not in roles:
        return others <= Q
    actor = w.models["actor"]
    for t in train_layouts(actor, n, A100):
        if train_memory(actor, t, seq_len=w.seq_len) + others > Q:
            continue
        for g in gen_layouts(actor, t):
            try:
                max_concurrent_seqs(actor, t, g, A100, seq_len=w.seq_len, reserved_bytes=others)
                return True
            except ValueError:
                pass
    return False


@pytest.mark.parametrize("roles", [("actor",), ("critic",), ("ref",), ("actor", "critic"),
                                   ("actor", "ref", "critic", "reward")])
def test_min_allocation_is_minimal(roles):
    w = Workload.paper("ppo", "13b", "34b")
    n = min_allocation(roles, w, A100)
    assert _fits(w, roles, n)
    assert not any(_fits(w, roles, m) for m in device_counts(n - 1, A100))
    assert n > 1 or roles == ("ref",)


def test_auto_parallel_is_algorithm_2():
    w = Workload.paper("ppo", "7b")
    planner = Planner(w, A100)
    plan, cost = auto_parallel("actor", w.models["actor"], 16, w, A100, planner=planner)
    assert auto_parallel("actor", None, 16, w, A100, planner=planner) == (plan, cost)
    assert any(key[:2] == ("actor", 16) for key in planner._roles)  # memoised per (role, devices)
    best = float("inf")  # every (p, t, d) with t <= 8 and (pg, tg) inside it, alone on 16 devices
    for t in train_layouts(w.models["actor"], 16, A100):
        if train_memory(w.models["actor"], t, seq_len=w.seq_len) > Q:
            continue
        for g in gen_layouts(w.models["actor"], t):
            p = type(plan)("actor", 16, t, g)
            try:
                total = sum(stage_time(s, w, p, A100) for s in w.stages if s.role == "actor")
            except ValueError:
                continue
            best = min(best, total + transition_time(w.models["actor"], t, g, A100))
    assert cost == pytest.approx(best, rel=1e-12)
    assert plan.train.tp <= 8 and plan.train.pp % plan.gen.pg == 0 and plan.train.tp % plan.gen.tg == 0
    critic, _ = auto_parallel("critic", w.models["critic"], 16, w, A100)
    assert critic.gen is None and critic.train.num_devices == 16


CASES = [("ppo", ("7b", "13b"), 8), ("grpo", ("7b",), 16), ("remax", ("1.3b",), 8), ("safe_rlhf", ("1.3b",), 2)]


@pytest.mark.parametrize("algo,sizes,n", CASES)
def test_search_equals_brute_force(algo, sizes, n):
    """Each placement's best mapping is the brute force's best for that placement (every allocation and
    every layout of every role simulated), so the ranking's first is the overall optimum."""
    w = Workload.paper(algo, *sizes)
    ranked = search(w, n, A100, top_k=100)
    assert [e.total_s for e in ranked] == sorted(e.total_s for e in ranked)
    assert len(ranked) == len({e.mapping.placement for e in ranked})
    for est in ranked:
        ref = brute_force(w, n, A100, placements=[est.mapping.placement])
        assert est.total_s == pytest.approx(ref.total_s, rel=1e-9), (est.mapping.describe(), ref.mapping.describe())
    placements = {e.mapping.placement for e in ranked}
    missing = [p for p in set_partitions(w.roles) if p not in placements]
    for p in missing:  # a placement the search found nothing for has no fitting mapping at all
        with pytest.raises(ValueError, match="no mapping"):
            brute_force(w, n, A100, placements=[p])


def _check_fits(w: Workload, est) -> None:
    """The cost model's own memory functions: every set within a device, the actor able to generate."""
    m = est.mapping
    for members, n in zip(m.placement, m.allocation):
        memory = {}
        for r in members:
            plan = m.plan(r)
            assert plan.num_devices == n == plan.train.num_devices and plan.train.tp <= A100.devices_per_node
            memory[r] = sum(train_memory(spec, plan.train, seq_len=w.seq_len) if trained
                            else inference_memory(spec, plan.train) for spec, trained in w.role_models(r))
        assert sum(memory.values()) <= Q, m.describe()
        if "actor" in members:
            a = m.plan("actor")
            assert max_concurrent_seqs(w.models["actor"], a.train, a.gen, A100, seq_len=w.seq_len,
                                       reserved_bytes=sum(memory.values()) - memory["actor"]) >= 1


@pytest.mark.parametrize("algo,sizes,n", [("ppo", ("13b", "34b"), 32), ("safe_rlhf", ("7b",), 8),
                                          ("ppo", ("7b",), 8)])
def test_search_returns_only_fitting_mappings(algo, sizes, n):
    w = Workload.paper(algo, *sizes)
    ranked = search(w, n, A100, top_k=100)
    assert ranked
    for est in ranked:
        assert sum(est.mapping.allocation) == n
        _check_fits(w, est)


@pytest.mark.parametrize("args,n,match", [
    (("ppo", "7b"), 12, "multiple of 8"),
    (("ppo", "7b"), 3, r"multiple of 8 .* \[1, 2, 4\]"),
    # 24, not 16: generating in one pipeline stage (hfrl's rollout engine), a tg = 8 replica holds all
    # 140 GB of weights beside the 16-way shard's gradients and Adam state (~61 GB) -- over 72 GB
    (("ppo", "70b"), 8, r"role 'actor' \(model 70b\) fits on no set of at most 8 .* needs 24"),
    (("ppo", "7b"), 2, r"no mapping .* fits on 2 .* alone the roles need \{'actor': 2"),
])
def test_bad_input(args, n, match):
    with pytest.raises(ValueError, match=match):
        search(Workload.paper(*args), n, A100)


def test_more_roles_than_devices_fit_colocated():
    ranked = search(Workload.paper("ppo", "1.3b"), 1, A100)
    assert [e.mapping.placement for e in ranked] == [(("actor", "ref", "critic", "reward"),)]
    with pytest.raises(ValueError, match="top_k"):
        search(Workload.paper("ppo", "1.3b"), 1, A100, top_k=0)
    with pytest.raises(ValueError, match="subset"):
        min_allocation(("actor", "cost"), Workload.paper("ppo", "7b"), A100)


def _best_split(ranked):
    return min(e.total_s for e in ranked if len(e.mapping.placement) > 1)


def test_paper_finding_same_size_models_colocate():
    """HybridFlow §8 (placement study): with actor, reference, critic and reward of the same size (7B),
    colocating all four on every device is the best placement from 16 to 64 GPUs. The model agrees;
    the best split placement is 13-20% slower here."""
    w = Workload.paper("ppo", "7b")
    planner = Planner(w, A100)
    for n in (16, 32, 64):
        ranked = search(w, n, A100, top_k=15, planner=planner)
        assert ranked[0].mapping.placement == (("actor", "ref", "critic", "reward"),), ranked[0].mapping.describe()
        assert 1.1 < _best_split(ranked) / ranked[0].total_s < 1.3


def test_paper_finding_large_critic_at_scale_disagrees():
    """HybridFlow §8 (placement study, issue 11): for a 13B actor and reference with 34B critic and reward,
    splitting the models over device sets beats colocating them at 96-128 GPUs.

    This cost model disagrees: colocating all four stays best, and the best split is slower by 14% at
    96 GPUs and 9% at 128 (it does close in from 27% at 32 GPUs). Why: the model scales every stage almost
    linearly in its devices (constant matmul efficiency, no per-GPU batch or launch overheads, DP
    all-reduce cost flat in dp), so running the stages one after another on all devices costs what
    running them side by side on parts does, minus the idle time a split leaves on the set that
    finishes first. Splitting wins only through sub-linear scaling (the generation's and the pipeline
    bubbles' here, which are mild) - the effects the paper measures at large scale (small per-GPU
    batches, communication that stops overlapping) are not in the model. The test pins the measured gap,
    so a cost model change that moves it is noticed."""
    w = Workload.paper("ppo", "13b", "34b")
    planner = Planner(w, A100)
    for n, lo, hi in ((96, 1.05, 1.25), (128, 1.03, 1.2)):
        ranked = search(w, n, A100, top_k=15, planner=planner)
        assert len(ranked[0].mapping.placement) == 1, ranked[0].mapping.describe()
        assert lo < _best_split(ranked) / ranked[0].total_s < hi


def test_searched_generation_layouts_are_runnable():
    """hfrl's rollout engine generates in one pipeline stage, so no searched plan has pg > 1, even where
    the training layout is pipelined (70B on 64 GPUs)."""
    ranked = search(Workload.paper("ppo", "70b"), 64, A100, top_k=16)
    plans = [p for e in ranked for p in e.mapping.plans if p.gen is not None]
    assert plans and all(p.gen.pg == 1 for p in plans)
    assert any(p.train.pp > 1 for p in plans)


def test_time_shared_search_ranks_placements_by_time_shared_cores():
    """4 CPU ranks on 2 cores: each placement's best layouts come from the oversubscribed profile, the
    ranking from the simulator with the cores time-shared among busy ranks; a colocated placement's
    4 ranks are always busy together, so it loses the lead it has under a uniformly shared profile."""
    import dataclasses

    from hfrl.mapping import ModelSpec, simulate

    cpu = dataclasses.replace(A100, name="cpu", devices_per_node=2, peak_flops=5e10, mem_bandwidth=1e10,
                              intra_node_bandwidth=5e9, memory_bytes=8 << 30, call_overhead_s=1e-3,
                              pass_overhead_s=2e-3, layer_overhead_s=3e-4, decode_step_overhead_s=1e-3)
    small = ModelSpec(name="small", num_layers=4, hidden_size=256, intermediate_size=704, num_heads=4,
                      num_kv_heads=2, vocab_size=64)
    w = Workload(algorithm="ppo", models={"actor": small, "ref": small, "critic": small.as_value_model(),
                                          "reward": small.as_value_model()},
                 prompt_len=8, response_len=32, num_prompts=16)
    uniform = search(w, 4, cpu.oversubscribed(4), top_k=100)
    shared = search(w, 4, cpu, top_k=100, time_shared=True)
    assert [e.total_s for e in shared] == sorted(e.total_s for e in shared)
    assert {e.mapping for e in shared} == {e.mapping for e in uniform}   # the same layouts, ranked anew
    for est in shared:
        assert est.total_s == simulate(w, est.mapping, cpu, cores=2).total_s
    assert search(w, 4, cpu, top_k=2, time_shared=True) == shared[:2]
    assert len(uniform[0].mapping.placement) < len(shared[0].mapping.placement)   # colocation lost the lead
    assert search(w, 2, cpu, time_shared=True)[0] == search(w, 2, cpu)[0]   # ranks fit the cores: unchanged
