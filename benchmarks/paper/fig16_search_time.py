"""Figure 16 (auto-mapping time): how long hfrl's placement and parallelism search
(`hfrl.mapping.search`, the paper's Algorithms 1 and 2, exact) takes on this machine, against the
device count.

    python benchmarks/paper/fig16_search_time.py            # results/fig16_search_time.{jsonl,png}
    python benchmarks/paper/fig16_search_time.py --quick    # up to 64 devices

Two series, each search timed once from a cold memo, for the paper's workload on the A100-80GB
profile (prompt 1024 + response 1024, 1024 prompts):

- `devices`: PPO with a 7B actor, reference, critic and reward on 8 to 1024 GPUs
  (benchmarks/auto_mapping.py's search_time_line);
- `scaled`: model size and device count grown together as in the paper's figure: PPO 7B on 16 GPUs,
  13B on 32, 34B on 64, 70B on 128, and Safe-RLHF (five models, 52 placements) 7B on 16 and 32.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PAPER_DEVICE, Results, out_dir, parser, pyplot  # noqa: E402

DEVICES = (8, 16, 32, 64, 128, 256, 512, 1024)
SCALED = [("ppo", "7b", 16), ("ppo", "13b", 32), ("ppo", "34b", 64), ("ppo", "70b", 128),
          ("safe_rlhf", "7b", 16), ("safe_rlhf", "7b", 32)]


def devices_series(results: Results, counts) -> None:
    from hfrl.mapping import get_profile

    from auto_mapping import search_time_line

    device = get_profile(PAPER_DEVICE)
    for n in counts:
        line = search_time_line(n, device)
        line.pop("line", None)
        results.emit(kind="search_time", series="devices", **line)


def scaled_series(results: Results, cases) -> None:
    from hfrl.mapping import Workload, get_profile, search

    device = get_profile(PAPER_DEVICE)
    for algorithm, size, n in cases:
        start = time.perf_counter()
        best = search(Workload.paper(algorithm, size), n, device, top_k=1)[0]
        results.emit(kind="search_time", series="scaled", algorithm=algorithm, model=size, devices=n,
                     search_s=round(time.perf_counter() - start, 3), best_total_s=round(best.total_s, 2),
                     best=best.mapping.describe())


def draw(results: Results) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in results.of("search_time") if r["series"] == "devices"]
    left.plot([r["devices"] for r in rows], [r["search_s"] for r in rows], marker="o")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("GPUs")
    left.set_ylabel("search time (s, this machine)")
    left.set_title("PPO, 7B models, A100-80GB profile")
    rows = [r for r in results.of("search_time") if r["series"] == "scaled"]
    right.bar(range(len(rows)), [r["search_s"] for r in rows])
    right.set_xticks(range(len(rows)), [f"{r['algorithm']}\n{r['model']} x{r['devices']}" for r in rows], fontsize=7)
    right.set_ylabel("search time (s, this machine)")
    right.set_title("model size and GPUs scaled together")
    results.save_figure(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    results = Results("fig16_search_time", out_dir(args))
    devices_series(results, DEVICES[:4] if args.quick else DEVICES)
    scaled_series(results, SCALED[:1] if args.quick else SCALED)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
