"""Scalability (HybridFlow §8.2, with Figures 9-11): strong-scaling efficiency as the paper defines
it, the throughput at the largest device count over the throughput at the smallest, divided by the
ratio of the device counts (the batch stays the same).

    python benchmarks/paper/scaling.py            # results/scaling.{jsonl,png}
    python benchmarks/paper/scaling.py --quick    # 2 iterations; PPO 7B only when simulating

Measured (CPU scale): PPO with the mapping hfrl's search picks on 1 and on 2 ranks (this machine has
two cores, so 2 ranks is its largest scale without time-sharing), `hfrl train` under torchrun,
common.py's models and batch; the mean throughput over the iterations after the first.

Simulated (paper scale, A100-80GB, the paper's workload): for each algorithm and model size of
fig09_11_e2e.py's simulated cases that has two or more device counts, the efficiency of hfrl's
searched mapping from the fewest to the most devices. The predictions are read from
fig09_11_e2e.jsonl in the results folder when it is there (run_all runs that script first), else
computed here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Results, assets, base_config, cpu_workload, mapping_overrides, measure, out_dir, parser, \
    pyplot, ranks_on, this_machine, with_overrides  # noqa: E402

RANKS = (1, 2)


def measured(results: Results, profile, folder: Path, steps: int) -> None:
    from hfrl.mapping import search, simulate

    from strategies import runnable

    config = base_config("ppo", folder, steps)
    workload = cpu_workload(config, "ppo")
    rows = {}
    for ranks in RANKS:
        device = ranks_on(profile, ranks)
        mapping, note = runnable(workload, search(workload, ranks, device, top_k=1)[0].mapping, device)
        case = with_overrides(config, mapping_overrides(mapping, "ppo"))
        try:
            out = measure(case, ranks, f"ppo-{ranks}", "ppo")
        except RuntimeError as err:
            results.emit(kind="error", ranks=ranks, error=str(err)[-1500:])
            return
        rows[ranks] = results.emit(kind="measured", mapping=mapping.describe(), note=note,
                                   predicted_iteration_s=simulate(workload, mapping, device).total_s, **out)
    lo, hi = rows[RANKS[0]], rows[RANKS[-1]]
    results.emit(kind="measured_efficiency", algorithm="ppo", ranks_min=RANKS[0], ranks_max=RANKS[-1],
                 efficiency=efficiency(lo["throughput_tokens_per_s"], hi["throughput_tokens_per_s"],
                                       RANKS[0], RANKS[-1]))


def efficiency(throughput_min: float, throughput_max: float, n_min: int, n_max: int) -> float:
    """The paper's strong-scaling efficiency: (throughput_max / throughput_min) / (n_max / n_min)."""
    return throughput_max / throughput_min / (n_max / n_min)


def simulated_lines(results: Results, quick: bool) -> tuple[list[dict], str]:
    """(fig09_11_e2e's simulated lines, where they came from): its results file, else simulated now."""
    import fig09_11_e2e

    path = results.out / "fig09_11_e2e.jsonl"
    if path.is_file():
        lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        sims = [l for l in lines if l.get("kind") == "simulated"]
        counts: dict[tuple, set] = {}
        for l in sims:
            counts.setdefault((l["algorithm"], l["actor"]), set()).add(l["devices"])
        if any(len(c) > 1 for c in counts.values()):   # a quick run's single case has nothing to scale
            return sims, path.name
    from hfrl.mapping import Planner, Workload, get_profile, search

    from common import PAPER_DEVICE

    cases = {a: [(size, (counts[0], counts[-1])) for size, counts in sizes if len(counts) > 1]
             for a, sizes in fig09_11_e2e.SIM_CASES.items()}
    if quick:
        cases = {"ppo": [("7b", (16, 32))]}
    device, sims = get_profile(PAPER_DEVICE), []
    for algorithm, sizes in cases.items():
        for size, counts in sizes:
            workload = Workload.paper(algorithm, size)
            tokens = workload.num_prompts * (workload.prompt_len + workload.response_len)
            planner = Planner(workload, device)
            for n in counts:
                best = search(workload, n, device, top_k=1, planner=planner)[0]
                sims.append({"algorithm": algorithm, "actor": size, "devices": n,
                             "tokens_per_s": {"hfrl": tokens / best.total_s}})
    return sims, "simulated here"


def simulated(results: Results, quick: bool) -> None:
    groups: dict[tuple, list[dict]] = {}
    sims, source = simulated_lines(results, quick)
    for line in sims:
        groups.setdefault((line["algorithm"], line["actor"]), []).append(line)
    for (algorithm, actor), lines in groups.items():
        lines = sorted((l for l in lines if l["tokens_per_s"]["hfrl"]), key=lambda l: l["devices"])
        if len(lines) < 2:
            continue
        lo, hi = lines[0], lines[-1]
        results.emit(kind="simulated", algorithm=algorithm, actor=actor, source=source, devices_min=lo["devices"],
                     devices_max=hi["devices"], tokens_per_s={l["devices"]: l["tokens_per_s"]["hfrl"] for l in lines},
                     efficiency=efficiency(lo["tokens_per_s"]["hfrl"], hi["tokens_per_s"]["hfrl"], lo["devices"],
                                           hi["devices"]))


def draw(results: Results) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results.of("measured")
    left.plot([r["ranks"] for r in rows], [r["throughput_tokens_per_s"] for r in rows], marker="o", label="measured")
    if rows:
        left.plot([r["ranks"] for r in rows], [rows[0]["throughput_tokens_per_s"] * r["ranks"] / rows[0]["ranks"]
                                               for r in rows], ls="--", color="grey", label="linear")
    left.set_ylim(bottom=0)
    left.set_xticks(list(RANKS))
    left.set_xlabel("ranks")
    left.set_ylabel("tokens/s")
    left.set_title("measured: PPO, hfrl's mapping (CPU scale)")
    left.legend(fontsize=8)
    sims = results.of("simulated")
    right.bar(range(len(sims)), [s["efficiency"] for s in sims])
    right.set_xticks(range(len(sims)), [f"{s['algorithm']} {s['actor']} {s['devices_min']}->{s['devices_max']}"
                                        for s in sims], fontsize=7, rotation=90)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("strong-scaling efficiency")
    right.set_title("simulated: hfrl's mapping, A100-80GB")
    results.save_figure(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    results = Results("scaling", out_dir(args))
    profile = this_machine(args, results)
    with assets() as folder:
        measured(results, profile, folder, 2 if args.quick else 4)
    simulated(results, args.quick)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
