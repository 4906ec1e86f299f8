"""Figure 12 (placement): PPO throughput with every model colocated, each model on its own devices
(standalone), actor + reference apart from critic + reward (split), and the placement hfrl's search
picks (auto).

    python benchmarks/paper/fig12_placement.py            # results/fig12_placement.{jsonl,png}
    python benchmarks/paper/fig12_placement.py --quick    # 2 iterations, one simulated case

Each placement gets its best layouts: `hfrl.mapping.search` returns every placement's best mapping,
and the placement's line uses that one ("auto" is the overall best).

Measured (CPU scale, PPO, `hfrl train` on 4 ranks; common.py's models and batch; four ranks time-share
the two cores, and the search knows it: `search(..., time_shared=True)` finds each placement's best
layouts with the oversubscribed profile, DeviceProfile.oversubscribed, and ranks the placements by the
simulator with the cores time-shared among the ranks busy at each moment, `simulate(..., cores=2)`,
which lets a waiting rank leave its core to the others): one run per placement (placement.mode
custom, mapping_to_config), the mean throughput over the iterations after the first. Each line's
`predicted_iteration_s` is that time-shared prediction.

Simulated (paper scale, A100-80GB, the paper's workload): predicted tokens/s of each placement for
PPO with 7B actor, reference, critic and reward on 16-64 GPUs, and with a 13B actor and reference and
34B critic and reward on 32-128 GPUs (the two settings of the paper's placement study).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Results, assets, base_config, cpu_workload, mapping_overrides, measure, out_dir, parser, \
    pyplot, ranks_on, this_machine, with_overrides  # noqa: E402

RANKS = 4
PLACEMENTS = ("colocate", "standalone", "split", "auto")
SIM_CASES = [("7b", "7b", (16, 32, 64)), ("13b", "34b", (32, 64, 96, 128))]
QUICK_SIM_CASES = [("7b", "7b", (16,))]


def by_placement(ranked) -> dict:
    """placement name -> the Estimate of its best mapping in `search`'s ranked list (absent: none fits)."""
    out = {"auto": ranked[0]}
    for est in ranked:
        sets = est.mapping.placement
        if len(sets) == 1:
            out.setdefault("colocate", est)
        elif all(len(s) == 1 for s in sets):
            out.setdefault("standalone", est)
        elif sorted(map(sorted, sets)) == [["actor", "ref"], ["critic", "reward"]]:
            out.setdefault("split", est)
    return out


def measured(results: Results, profile, folder: Path, steps: int) -> None:
    from hfrl.mapping import search, simulate

    from strategies import runnable

    config = base_config("ppo", folder, steps)
    workload = cpu_workload(config, "ppo")
    device = ranks_on(profile, RANKS)
    found = by_placement(search(workload, RANKS, profile, top_k=64, time_shared=True))
    for name in PLACEMENTS:
        est = found.get(name)
        if est is None:
            results.emit(kind="error", placement=name, error="no mapping of this placement fits")
            continue
        mapping, note = runnable(workload, est.mapping, device)
        case = with_overrides(config, mapping_overrides(mapping, "ppo"))
        try:
            out = measure(case, RANKS, f"ppo-{name}", "ppo")
        except RuntimeError as err:
            results.emit(kind="error", placement=name, error=str(err)[-1500:])
            continue
        out.pop("placement", None)
        results.emit(kind="measured", placement=name, mapping=mapping.describe(), note=note,
                     predicted_iteration_s=simulate(workload, mapping, profile, cores=profile.devices_per_node).total_s,
                     **out)


def simulated(results: Results, cases) -> None:
    from hfrl.mapping import Planner, Workload, get_profile, search

    from common import PAPER_DEVICE

    device = get_profile(PAPER_DEVICE)
    for actor, critic, counts in cases:
        workload = Workload.paper("ppo", actor, critic)
        tokens = workload.num_prompts * (workload.prompt_len + workload.response_len)
        planner = Planner(workload, device)
        for n in counts:
            found = by_placement(search(workload, n, device, top_k=64, planner=planner))
            results.emit(kind="simulated", algorithm="ppo", actor=actor, critic=critic, devices=n,
                         tokens_per_s={p: (tokens / found[p].total_s if p in found else None) for p in PLACEMENTS},
                         mappings={p: found[p].mapping.describe() for p in found},
                         best_fixed=max((p for p in PLACEMENTS[:3] if p in found),
                                        key=lambda p: tokens / found[p].total_s))


def draw(results: Results) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = {r["placement"]: r["throughput_tokens_per_s"] for r in results.of("measured")}
    left.bar(range(len(PLACEMENTS)), [rows.get(p, 0.0) for p in PLACEMENTS], color=["C0", "C1", "C2", "C3"])
    left.set_xticks(range(len(PLACEMENTS)), PLACEMENTS)
    left.set_ylabel("tokens/s (measured)")
    left.set_title(f"CPU scale: PPO on {RANKS} ranks (hfrl train)")
    sims = results.of("simulated")
    labels = [f"{s['actor']}/{s['critic']}\nx{s['devices']}" for s in sims]
    width = 0.2
    for i, p in enumerate(PLACEMENTS):
        right.bar([j + (i - 1.5) * width for j in range(len(sims))], [s["tokens_per_s"][p] or 0.0 for s in sims],
                  width, label=p)
    right.set_xticks(range(len(labels)), labels, fontsize=7)
    right.set_ylabel("tokens/s (predicted)")
    right.set_title("paper scale, simulated: PPO (A100-80GB)")
    right.legend(fontsize=8)
    results.save_figure(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    results = Results("fig12_placement", out_dir(args))
    profile = this_machine(args, results)
    with assets() as folder:
        measured(results, profile, folder, 2 if args.quick else 3)
    simulated(results, QUICK_SIM_CASES if args.quick else SIM_CASES)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
