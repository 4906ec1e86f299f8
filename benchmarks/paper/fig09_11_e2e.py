"""Figures 9-11 (end-to-end throughput): PPO, ReMax and Safe-RLHF with hfrl's chosen mapping against
the baselines' strategies expressed in hfrl (strategies.py: NeMo-Aligner, DeepSpeed-Chat and OpenRLHF
style). These are the strategies, not those systems.

    python benchmarks/paper/fig09_11_e2e.py            # measured + simulated, results/fig09_11_e2e.{jsonl,png}
    python benchmarks/paper/fig09_11_e2e.py --quick    # PPO only, 2 iterations, one simulated case

Measured (CPU scale, `hfrl train` under torchrun on 2 ranks; common.py's models and batch): for each
algorithm, the search (hfrl.mapping.search with this machine's calibrated profile and the job's own
model shapes) picks hfrl's mapping; the NeMo-style and DS-Chat-style runs take the best all-colocated
mapping with generation in the training layout, DS-Chat's with `hybrid.mode: ds_chat`. Each runs as a
config (placement.mode custom, mapping_to_config) and the line reports the mean over the iterations
after the first: throughput (the paper's metric: prompt + response tokens / iteration seconds), the
iteration and stage times, and the simulator's prediction for the same mapping. OpenRLHF style runs
with hfrl's rollout role (strategies.openrlhf_overrides): every model on rank 0, generation on rank 1,
the actor's weights broadcast to it after every update (`timing_s.weight_sync`); the simulator has no
CPU-scale prediction for it (its OpenRLHF model is paper scale only).

Simulated (paper scale: A100-80GB profile, prompt 1024 + response 1024, 1024 prompts per batch;
actor and reference of one size, critic, reward and cost models of the same size): predicted
tokens/s of the four strategies and hfrl's speedup over each, per algorithm, model size and device
count (`kind: simulated`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Results, assets, base_config, cpu_workload, mapping_overrides, measure, out_dir, parser, \
    pyplot, ranks_on, this_machine, with_overrides  # noqa: E402

RANKS = 2
ALGORITHMS = ("ppo", "remax", "safe_rlhf")
SIM_CASES = {   # algorithm -> [(model size, device counts)]; Safe-RLHF's 5-role search is the dearest
    "ppo": [("7b", (16, 32, 64, 128)), ("13b", (32, 64, 128)), ("34b", (64, 128)), ("70b", (64, 128))],
    "remax": [("7b", (16, 32, 64, 128)), ("13b", (32, 64, 128)), ("34b", (64, 128)), ("70b", (64, 128))],
    "safe_rlhf": [("7b", (16, 32)), ("13b", (32,)), ("34b", (64,)), ("70b", (64, 128))],
}
QUICK_SIM_CASES = {"ppo": [("7b", (16,))]}
OPENRLHF_MAPPING = "train pool [0]: every model (dp=1) | rollout pool [1]: generation (tg=1), weight sync"


def measured(results: Results, profile, folder: Path, algorithms, steps: int) -> None:
    from hfrl.mapping import search

    from strategies import openrlhf_overrides, predict, runnable_strategies

    device = ranks_on(profile, RANKS)
    for algorithm in algorithms:
        config = base_config(algorithm, folder, steps)
        workload = cpu_workload(config, algorithm)
        ranked = search(workload, RANKS, device, top_k=64)
        for name, (mapping, mode, note) in runnable_strategies(workload, ranked, device).items():
            case = with_overrides(config, mapping_overrides(mapping, algorithm, mode))
            try:
                out = measure(case, RANKS, f"{algorithm}-{name}", algorithm)
            except RuntimeError as err:
                results.emit(kind="error", algorithm=algorithm, strategy=name, error=str(err)[-1500:])
                continue
            results.emit(kind="measured", strategy=name, mapping=mapping.describe(), hybrid_mode=mode or "hybridflow",
                         predicted_iteration_s=predict(workload, mapping, mode, device), note=note, **out)
        case = with_overrides(config, openrlhf_overrides(config, RANKS))
        try:
            out = measure(case, RANKS, f"{algorithm}-openrlhf", algorithm)
        except RuntimeError as err:
            results.emit(kind="error", algorithm=algorithm, strategy="openrlhf", error=str(err)[-1500:])
            continue
        results.emit(kind="measured", strategy="openrlhf", mapping=OPENRLHF_MAPPING, hybrid_mode="rollout role",
                     predicted_iteration_s=None, note=None, **out)


def simulated(results: Results, cases: dict) -> None:
    from hfrl.mapping import Planner, Workload, get_profile

    from common import PAPER_DEVICE
    from strategies import paper_case

    device = get_profile(PAPER_DEVICE)
    for algorithm, sizes in cases.items():
        for size, counts in sizes:
            planner = Planner(Workload.paper(algorithm, size), device)
            for n in counts:
                results.emit(kind="simulated", **paper_case(algorithm, size, size, n, device, planner))


def draw(results: Results) -> None:
    from strategies import MEASURABLE, STRATEGIES

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1, 2]})
    rows = results.of("measured")
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    width = 0.8 / len(MEASURABLE)
    for i, name in enumerate(MEASURABLE):
        values = [next((r["throughput_tokens_per_s"] for r in rows if r["algorithm"] == a and r["strategy"] == name),
                       0.0) for a in algorithms]
        left.bar([j + (i - 1.5) * width for j in range(len(algorithms))], values, width, label=name)
    left.set_xticks(range(len(algorithms)), algorithms)
    left.set_ylabel("tokens/s (measured)")
    left.set_title("CPU scale: 2 ranks, 17.7M actor (hfrl train)")
    left.legend(fontsize=8)
    sims = results.of("simulated")
    labels = [f"{s['algorithm']} {s['actor']} x{s['devices']}" for s in sims]
    others = [n for n in STRATEGIES if n != "hfrl"]
    width = 0.8 / len(others)
    for i, name in enumerate(others):
        right.bar([j + (i - 1) * width for j in range(len(sims))], [s["speedup_vs"][name] or 0.0 for s in sims],
                  width, label=f"hfrl / {name}")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
    right.set_ylabel("hfrl speedup (predicted)")
    right.set_title("paper scale, simulated (A100-80GB, 1024 x (1024 + 1024) tokens)")
    right.legend(fontsize=8)
    results.save_figure(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    results = Results("fig09_11_e2e", out_dir(args))
    profile = this_machine(args, results)
    with assets() as folder:
        measured(results, profile, folder, ("ppo",) if args.quick else ALGORITHMS, 2 if args.quick else 5)
    simulated(results, QUICK_SIM_CASES if args.quick else SIM_CASES)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
