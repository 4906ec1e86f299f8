"""The baselines' strategies expressed in hfrl (HybridFlow §8.1's baselines), for the simulator and
for measured runs. These are the strategies, not those systems: each is a mapping (placement,
layouts, generation layout) and a resharding mode that hfrl runs or simulates with its own engines.

    hfrl      the mapping hfrl's search picks (placement, every role's layout, the actor's
              generation layout), 3D-HybridEngine resharding (mode hybridflow);
    nemo      NeMo-Aligner style: every model colocated, the actor generates in its training layout
              (tg = tp, pg = pp: nothing to reshard);
    ds_chat   DeepSpeed-Chat style: every model colocated, the ZeRO-style transition (the whole actor
              all-gathered over all its devices; Table 2's first row), generation in the training
              layout;
    openrlhf  OpenRLHF style: the actor generates on a device set of its own (a quarter or half of
              the devices, or one node, whichever is fastest) and receives the new weights every
              iteration (a broadcast of the actor over the inter-node link); every model trains and
              runs its forward passes on the other devices. Simulated at paper scale; measured at
              CPU scale with hfrl's rollout role (`openrlhf_overrides`: every model on the first
              ranks, generation on the last, the weights broadcast after every actor update).

The colocated baselines take the best colocated mapping the search finds (its per-role layouts,
chosen so that the models fit together), as the paper gives each baseline its best parallelism.
"""
from __future__ import annotations

from hfrl.mapping import GenLayout, Mapping, Planner, RolePlan, TrainLayout, Workload, generation_time, search, \
    simulate, transition_time

STRATEGIES = ("hfrl", "nemo", "ds_chat", "openrlhf")
MEASURABLE = ("hfrl", "nemo", "ds_chat", "openrlhf")


def openrlhf_overrides(config, ranks: int, generation_ranks: int = 1) -> dict:
    """Config overrides running `config`'s job OpenRLHF style on `ranks` ranks: every enabled role
    on the first ranks (pool "train", default layouts: data parallel), the rollout role on the last
    `generation_ranks` (pool "gen", tg = 1: one replica per rank), synced after every update."""
    from hfrl.distributed.resource_pool import ROLE_NAMES

    train = ranks - generation_ranks
    roles = {role: {"pool": "train", "pp": 1, "tp": 1, "dp": -1, "pg": None, "tg": None}
             for role in ROLE_NAMES if role != "rollout" and getattr(config.roles, role).enabled}
    roles["rollout"] = {"enabled": True, "pool": "gen", "tg": 1}
    return {"placement": {"mode": "custom", "pools": {"train": list(range(train)),
                                                      "gen": list(range(train, ranks))}},
            "roles": roles, "hybrid": {"mode": None, "offload_optimizer": False}}


def gen_in_train_layout(mapping: Mapping) -> Mapping:
    """`mapping` with the actor generating in its training layout (pg = pp, tg = tp)."""
    plans = tuple(RolePlan(p.role, p.num_devices, p.train, GenLayout(p.train.pp, p.train.tp))
                  if p.gen is not None else p for p in mapping.plans)
    return Mapping(mapping.placement, mapping.allocation, plans)


def strategy_mappings(ranked) -> dict[str, tuple[Mapping, str | None]]:
    """name -> (mapping, hybrid mode) of the measurable strategies, from `search`'s ranked list
    (every placement's best; ask for top_k >= 52 so the all-colocated one is in it)."""
    out = {"hfrl": (ranked[0].mapping, None)}
    together = [e.mapping for e in ranked if len(e.mapping.placement) == 1]
    if together:
        nemo = gen_in_train_layout(together[0])
        out.update(nemo=(nemo, None), ds_chat=(nemo, "ds_chat"))
    return out


def runnable_strategies(workload: Workload, ranked, device) -> dict[str, tuple[Mapping, str | None, str | None]]:
    """strategy_mappings, each made runnable by hfrl (`runnable`): name -> (mapping, mode, note)."""
    out = {}
    for name, (mapping, mode) in strategy_mappings(ranked).items():
        mapping, note = runnable(workload, mapping, device, gen_in_train=name != "hfrl")
        out[name] = (mapping, mode, note)
    return out


def runnable(workload: Workload, mapping: Mapping, device, *, gen_in_train: bool = False) -> tuple[Mapping, str | None]:
    """`mapping` as hfrl's runtime can run it, and a note when it had to change. hfrl's rollout
    engine generates with pg = 1 only (no pipeline-parallel generation), while the search and the
    NeMo-style strategy may give the actor pg > 1. Then the actor keeps its devices and set and
    takes, among the layouts with pg = 1 (its own training layout with every tg | tp; with
    `gen_in_train`, every layout with pp = 1 generating in itself), the one the simulator rates
    fastest."""
    actor = mapping.plan("actor")
    if actor.gen is None or actor.gen.pg == 1:
        return mapping, None
    n, spec = actor.num_devices, workload.models["actor"]
    if gen_in_train:
        tps = [t for t in (1, 2, 4, 8, 16) if n % t == 0 and t <= device.devices_per_node
               and spec.num_heads % t == 0 and (spec.num_kv_heads % t == 0 or t % spec.num_kv_heads == 0)]
        options = [(TrainLayout(1, t, n // t), GenLayout(1, t)) for t in tps]
    else:
        options = [(actor.train, GenLayout(1, tg)) for tg in range(1, actor.train.tp + 1) if actor.train.tp % tg == 0
                   and spec.num_heads % tg == 0]
    best = None
    for train, gen in options:
        plans = tuple(RolePlan("actor", n, train, gen) if p.role == "actor" else p for p in mapping.plans)
        candidate = Mapping(mapping.placement, mapping.allocation, plans)
        try:
            total = simulate(workload, candidate, device).total_s
        except ValueError:
            continue
        if best is None or total < best[0]:
            best = (total, candidate)
    if best is None:
        raise ValueError(f"no runnable generation layout (pg = 1) for the actor of {mapping.describe()}")
    return best[1], (f"hfrl generates with pg = 1 only: the actor's {actor.describe()} became "
                     f"{best[1].plan('actor').describe()}")


def predict(workload: Workload, mapping: Mapping, mode: str | None, device) -> float:
    """Predicted iteration seconds; the ds_chat mode swaps the actor's transition for Table 2's
    full all-gather. ValueError when the mapping does not fit."""
    est = simulate(workload, mapping, device)
    if mode in (None, "hybridflow"):
        return est.total_s
    actor = mapping.plan("actor")
    return est.total_s - est.transition_s + transition_time(workload.models["actor"], actor.train, actor.gen,
                                                            device, mode=mode)


def openrlhf_time(workload: Workload, num_devices: int, device, planner: Planner) -> float:
    """OpenRLHF style (module docstring): the best generation-set size; inf when none fits."""
    actor = workload.models["actor"]
    best = float("inf")
    for g in sorted({num_devices // 4, num_devices // 2, device.devices_per_node}):
        if not 1 <= g < num_devices:
            continue
        try:
            rest = [e for e in search(workload, num_devices - g, device, top_k=64, planner=planner)
                    if len(e.mapping.placement) == 1]
        except ValueError:   # not a valid device count, or the models do not fit there
            continue
        if not rest:
            continue
        est = rest[0]
        gen = _standalone_generation(workload, g, device)
        if gen is None:
            continue
        sync = actor.param_bytes() / device.inter_node_bandwidth
        best = min(best, est.total_s - est.stages["gen"] - est.transition_s + gen + sync)
    return best


def _standalone_generation(workload: Workload, g: int, device) -> float | None:
    """Generation on g devices holding nothing else, tg the smallest power of two that fits."""
    tg = 1
    while tg <= min(g, device.devices_per_node):
        try:
            return generation_time(workload.models["actor"], TrainLayout(1, tg, g // tg), GenLayout(1, tg), device,
                                   num_seqs=workload.num_prompts * workload.n, prompt_len=workload.prompt_len,
                                   response_len=workload.response_len, train_state_resident=False)
        except ValueError:
            tg *= 2
    return None


def paper_case(algorithm: str, actor: str, critic: str, num_devices: int, device, planner: Planner) -> dict:
    """Predicted tokens/s of every strategy for one case of the paper's Figures 9-11."""
    workload = planner.workload
    tokens = workload.num_prompts * workload.n * (workload.prompt_len + workload.response_len)
    ranked = search(workload, num_devices, device, top_k=64, planner=planner)
    times, layouts = {}, {}
    for name, (mapping, mode) in strategy_mappings(ranked).items():
        try:
            times[name] = predict(workload, mapping, mode, device)
            layouts[name] = mapping.describe()
        except ValueError:   # the strategy cannot hold the models on these devices
            times[name] = float("inf")
    times["openrlhf"] = openrlhf_time(workload, num_devices, device, planner)
    for name in STRATEGIES:
        times.setdefault(name, float("inf"))
    finite = lambda t: t != float("inf")  # noqa: E731
    return {"algorithm": algorithm, "actor": actor, "critic": critic, "devices": num_devices,
            "iteration_s": {k: (v if finite(v) else None) for k, v in times.items()},
            "tokens_per_s": {k: (tokens / v if finite(v) else None) for k, v in times.items()},
            "speedup_vs": {k: (v / times["hfrl"] if finite(v) else None) for k, v in times.items() if k != "hfrl"},
            "mappings": layouts}
