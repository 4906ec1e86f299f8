"""Auto-mapping: search time vs device count, and the best mapping's predicted throughput against the
baselines' strategies, for the HybridFlow paper's setup (A100-80GB, 8 per node, prompt 1024 +
response 1024, 1024 prompts per iteration).

    python benchmarks/auto_mapping.py                  # JSON lines + benchmarks/auto_mapping.png
    python benchmarks/auto_mapping.py --quick          # fewer cases

Lines:
- `search_time`: seconds `hfrl.mapping.search` takes for PPO with a 7B actor and critic, 8 to 1024
  devices (the issue's bound: seconds up to 128, minutes at 1024).
- `throughput`: for each (algorithm, actor/critic size, devices), the predicted tokens/s (the paper's
  metric: (prompt + response) tokens per iteration / iteration seconds) of
    hfrl       the searched mapping (placement, layouts, generation layout);
    nemo       every model colocated, generation in the training layout (NeMo-Aligner's strategy);
    ds_chat    every model colocated, ZeRO-style transition: the whole actor all-gathered over all
               its devices before generation (DeepSpeed-Chat's strategy, Table 2's first row);
    openrlhf   generation on its own device set (a quarter or half of the devices, whichever is
               faster) with a weight broadcast every iteration, every model trained and run on the
               rest (OpenRLHF's strategy).
  These are the strategies expressed in hfrl's cost model, not measurements of those systems; the
  baselines' per-model training layouts are the best ones for their devices (as the paper does).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from hfrl.mapping import (GenLayout, Mapping, RolePlan, TrainLayout, Workload, generation_time, get_profile, search,
                          simulate, transition_time)

HERE = Path(__file__).resolve().parent
CASES = [("ppo", "7b", "7b", (16, 32, 64)), ("ppo", "13b", "13b", (32, 64, 128)),
         ("ppo", "13b", "34b", (64, 96, 128)), ("ppo", "70b", "70b", (64, 96, 128)),
         ("remax", "7b", "7b", (16, 32, 64)), ("safe_rlhf", "7b", "7b", (16, 32, 64))]
QUICK_CASES = [("ppo", "7b", "7b", (16, 64)), ("ppo", "13b", "34b", (128,))]
SEARCH_DEVICES = (8, 16, 32, 64, 128, 256, 512, 1024)


def colocated(workload: Workload, num_devices: int, device, gen_in_train_layout: bool = False) -> Mapping:
    """Every role on all devices: the best such mapping the search finds (layouts chosen so the
    colocated models fit together); with gen_in_train_layout the actor generates in its training
    layout, as NeMo-Aligner does."""
    ranked = search(workload, num_devices, device, top_k=64)
    together = [e.mapping for e in ranked if len(e.mapping.placement) == 1]
    if not together:
        raise ValueError(f"no layout holds every model of {workload.algorithm} on {num_devices} devices at once")
    mapping = together[0]
    if not gen_in_train_layout:
        return mapping
    plans = tuple(RolePlan(p.role, p.num_devices, p.train, GenLayout(p.train.pp, p.train.tp))
                  if p.gen is not None else p for p in mapping.plans)
    return Mapping(mapping.placement, mapping.allocation, plans)


def baseline_nemo(workload, num_devices, device) -> float:
    return simulate(workload, colocated(workload, num_devices, device, gen_in_train_layout=True), device).total_s


def baseline_ds_chat(workload, num_devices, device) -> float:
    mapping = colocated(workload, num_devices, device)
    est = simulate(workload, mapping, device)
    actor = mapping.plan("actor")
    full = transition_time(workload.models["actor"], actor.train, actor.gen, device, mode="ds_chat")
    return est.total_s - est.transition_s + full


def baseline_openrlhf(workload, num_devices, device) -> float:
    """Generation on g devices (tg = the smallest power of two that fits the actor), the rest trains."""
    actor = workload.models["actor"]
    best = float("inf")
    for g in sorted({num_devices // 4, num_devices // 2, device.devices_per_node}):
        if not 1 <= g < num_devices:
            continue
        try:   # both sets must be valid device counts that hold their models
            rest = colocated(workload, num_devices - g, device)
        except ValueError:
            continue
        est = simulate(workload, rest, device)
        tg = 1
        while tg <= min(g, device.devices_per_node):
            try:
                gen = generation_time(actor, TrainLayout(1, tg, g // tg), GenLayout(1, tg), device,
                                      num_seqs=workload.num_prompts * workload.n, prompt_len=workload.prompt_len,
                                      response_len=workload.response_len, train_state_resident=False)
                break
            except ValueError:
                tg *= 2
        else:
            continue
        sync = actor.param_bytes() / device.inter_node_bandwidth   # broadcast of the new weights
        best = min(best, est.total_s - est.stages["gen"] - est.transition_s + gen + sync)
    return best


def throughput_line(algorithm, actor_size, critic_size, num_devices, device) -> dict:
    workload = Workload.paper(algorithm, actor_size, critic_size)
    tokens = workload.num_prompts * workload.n * (workload.prompt_len + workload.response_len)
    start = time.perf_counter()
    best = search(workload, num_devices, device, top_k=1)[0]
    elapsed = time.perf_counter() - start
    times = {"hfrl": best.total_s}
    for name, fn in (("nemo", baseline_nemo), ("ds_chat", baseline_ds_chat), ("openrlhf", baseline_openrlhf)):
        try:
            times[name] = fn(workload, num_devices, device)
        except ValueError as err:   # the strategy cannot hold the models on these devices
            times[name] = float("inf")
            print(json.dumps({"note": f"{name} infeasible for {algorithm} {actor_size}/{critic_size} x{num_devices}: "
                                      f"{err}"}), flush=True)
    return {"line": "throughput", "algorithm": algorithm, "actor": actor_size, "critic": critic_size,
            "devices": num_devices, "search_s": round(elapsed, 3), "best": best.mapping.describe(),
            "tokens_per_s": {k: (tokens / v if v != float("inf") else 0.0) for k, v in times.items()},
            "speedup_vs": {k: (v / times["hfrl"] if v != float("inf") else None) for k, v in times.items()
                           if k != "hfrl"}}


def search_time_line(num_devices, device) -> dict:
    workload = Workload.paper("ppo", "7b")
    start = time.perf_counter()
    ranked = search(workload, num_devices, device, top_k=1)
    return {"line": "search_time", "algorithm": "ppo", "model": "7b", "devices": num_devices,
            "search_s": round(time.perf_counter() - start, 3), "best_total_s": round(ranked[0].total_s, 2),
            "best": ranked[0].mapping.describe()}


def draw(search_lines, throughput_lines, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    left.plot([l["devices"] for l in search_lines], [l["search_s"] for l in search_lines], marker="o")
    left.set_xscale("log", base=2)
    left.set_xlabel("devices")
    left.set_ylabel("search time (s)")
    left.set_title("auto-mapping search time (PPO, 7B)")
    names = ["hfrl", "nemo", "ds_chat", "openrlhf"]
    labels = [f"{l['algorithm']} {l['actor']}/{l['critic']}\nx{l['devices']}" for l in throughput_lines]
    width = 0.2
    for i, name in enumerate(names):
        xs = [j + (i - 1.5) * width for j in range(len(throughput_lines))]
        right.bar(xs, [l["tokens_per_s"][name] for l in throughput_lines], width, label=name)
    right.set_xticks(range(len(labels)), labels, fontsize=6)
    right.set_ylabel("predicted tokens/s")
    right.set_title("predicted throughput (A100-80GB profile)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="a100-80gb")
    parser.add_argument("--png", default=str(HERE / "auto_mapping.png"))
    args = parser.parse_args()
    device = get_profile(args.device)
    search_lines = []
    for n in SEARCH_DEVICES[:5] if args.quick else SEARCH_DEVICES:
        search_lines.append(search_time_line(n, device))
        print(json.dumps(search_lines[-1]), flush=True)
    throughput_lines = []
    for algorithm, actor, critic, device_counts in QUICK_CASES if args.quick else CASES:
        for n in device_counts:
            throughput_lines.append(throughput_line(algorithm, actor, critic, n, device))
            print(json.dumps(throughput_lines[-1]), flush=True)
    if args.png and os.environ.get("HFRL_NO_PNG") != "1":
        draw(search_lines, throughput_lines, args.png)
        print(json.dumps({"line": "figure", "path": args.png}), flush=True)


if __name__ == "__main__":
    main()
