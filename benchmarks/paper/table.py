"""The README's results table, rebuilt from the scripts' JSON lines (pure: no torch, no hfrl).

    python benchmarks/paper/table.py [--results DIR] [--readme PATH]

One row per figure: the paper's headline (HybridFlow, EuroSys 2025), what hfrl measured on this
machine, what hfrl's simulator predicts at the paper's scale, and how far apart they are. The table
replaces the text between the two markers in benchmarks/paper/README.md; a script whose results
are missing shows as "not run".
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- paper-table:start -->", "<!-- paper-table:end -->"
SCRIPTS = ("fig09_11_e2e", "fig12_placement", "fig14_transition", "fig15_gen_tp", "scaling", "fig16_search_time")
PAPER = {
    "fig09_11_e2e": "Fig. 9-11: 1.53x-20.57x higher throughput than DeepSpeed-Chat, OpenRLHF and NeMo-Aligner "
                    "(PPO, ReMax, Safe-RLHF; 7B-70B models; 16-128 A100s)",
    "fig12_placement": "Fig. 12-13: no placement is best everywhere: with same-size 7B models colocating all "
                       "four wins (16-64 GPUs); a 13B actor with larger critic and reward models runs faster split "
                       "at 96-128 GPUs; HybridFlow's mapping matches the best",
    "fig14_transition": "Fig. 14: the 3D-HybridEngine cuts the train-to-generate transition time by 55.2% on "
                        "average, by 89.1% for the 70B model",
    "fig15_gen_tp": "Fig. 15: generating with a smaller TP than training (more replicas, less TP communication) "
                    "lowers generation latency",
    "scaling": "Sec. 8.2: 66.8% average strong-scaling efficiency (throughput ratio over device ratio, "
               "smallest to largest scale)",
    "fig16_search_time": "Fig. 16: the mapping search's time grows with the device count and model size; it runs "
                         "once, before training",
}
PAPER_MIN_SPEEDUP, PAPER_MAX_SPEEDUP = 1.53, 20.57
PAPER_TRANSITION_MEAN, PAPER_TRANSITION_70B = 0.552, 0.891
PAPER_EFFICIENCY = 0.668


def load(results: Path) -> dict[str, list[dict]]:
    """Script name -> its JSON lines (absent when the script has not written its file)."""
    out = {}
    for name in SCRIPTS:
        path = Path(results) / f"{name}.jsonl"
        if path.is_file():
            out[name] = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return out


def x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def span(values, fmt=x) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    text = fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"
    return text + (f" (median {fmt(statistics.median(values))}, {len(values)} cases)" if len(values) > 2 else "")


def _kind(lines, kind):
    return [l for l in lines if l.get("kind") == kind]


def _errors(lines) -> str:
    errors = _kind(lines, "error")
    return f" {len(errors)} case(s) failed (see the JSON lines)." if errors else ""


# ---- one row per script -------------------------------------------------------------------
def _range_verdict(name: str, values: list[float]) -> str:
    """Where `values` (hfrl's speedups) fall against the paper's 1.53x-20.57x."""
    inside = sum(PAPER_MIN_SPEEDUP <= v <= PAPER_MAX_SPEEDUP for v in values)
    below = sum(v < PAPER_MIN_SPEEDUP for v in values)
    lo, hi = min(values), max(values)
    text = f"{name} {x(lo)}: " if lo == hi else f"{name} {x(lo)}-{x(hi)}: "
    if inside == len(values):
        return text + "inside the paper's range"
    if below == len(values):
        return text + f"below the paper's range (the largest is {pct(max(values) / PAPER_MIN_SPEEDUP)} of its 1.53x)"
    return text + f"{inside} of {len(values)} inside the paper's range, {below} below, {len(values) - inside - below} above"


def row_e2e(lines) -> tuple[str, str, str]:
    measured = _kind(lines, "measured")
    thr = {(l["algorithm"], l["strategy"]): l["throughput_tokens_per_s"] for l in measured}
    algorithms = list(dict.fromkeys(l["algorithm"] for l in measured))
    parts, verdict = [], []
    for base, label in (("nemo", "NeMo-style"), ("ds_chat", "DS-Chat-style"), ("openrlhf", "OpenRLHF-style")):
        per = {a: thr[(a, "hfrl")] / thr[(a, base)] for a in algorithms if (a, "hfrl") in thr and (a, base) in thr}
        parts.append(f"hfrl's mapping / {label}: " + ", ".join(f"{a} {x(v)}" for a, v in per.items()))
        if per:
            verdict.append(_range_verdict(f"measured vs {label}", list(per.values())))
    ranks = measured[0]["ranks"] if measured else "?"
    measured_text = (f"{ranks} ranks, tokens/s ratios: " + "; ".join(parts) + "." + _errors(lines)) \
        if measured else "not run"
    sims = _kind(lines, "simulated")
    sim_parts = []
    for base, label in (("nemo", "NeMo-style"), ("ds_chat", "DS-Chat-style"), ("openrlhf", "OpenRLHF-style")):
        values = [s["speedup_vs"].get(base) for s in sims]
        sim_parts.append(f"vs {label} {span(values)}")
        if any(v is not None for v in values):
            verdict.append(_range_verdict(f"simulated vs {label}", [v for v in values if v is not None]))
    sim_text = ("hfrl's searched mapping " + "; ".join(sim_parts)) if sims else "not run"
    return measured_text, sim_text, "; ".join(verdict) or "n/a"


def row_placement(lines) -> tuple[str, str, str]:
    measured = {l["placement"]: l for l in _kind(lines, "measured")}
    if measured:
        best = max(measured, key=lambda p: measured[p]["throughput_tokens_per_s"])
        ranks = next(iter(measured.values()))["ranks"]
        auto = measured.get("auto")
        share = auto["throughput_tokens_per_s"] / measured[best]["throughput_tokens_per_s"] if auto else None
        measured_text = (f"PPO, {ranks} ranks, tokens/s: " + ", ".join(
            f"{p} {l['throughput_tokens_per_s']:.0f}" for p, l in measured.items()) +
            f". Fastest: {best}; hfrl's pick ({auto['mapping'].split(':')[0] if auto else '?'}) reaches "
            f"{pct(share)} of it." + _errors(lines))
    else:
        measured_text, share, best = "not run", None, None
    sims = _kind(lines, "simulated")
    gaps = [(s, _gap(s["tokens_per_s"])) for s in sims]
    sim_parts = []
    for pair in dict.fromkeys((s["actor"], s["critic"]) for s in sims):
        group = [(s, g) for s, g in gaps if (s["actor"], s["critic"]) == pair]
        sim_parts.append(f"{pair[0]}/{pair[1]} " + ", ".join(f"x{s['devices']}" for s, _ in group) +
                         ": best of the three " + ", ".join(s["best_fixed"] for s, _ in group) +
                         "; colocate/split throughput " + ", ".join(x(g) for _, g in group))
    sim_text = "; ".join(sim_parts) if sims else "not run"
    verdict = []
    small = [s for s, _ in gaps if s["actor"] == s["critic"]]
    if small:
        agree = all(s["best_fixed"] == "colocate" for s in small)
        verdict.append("equal sizes: colocate best, as in the paper" if agree else
                       "equal sizes: colocate not always best, unlike the paper")
    large = [(s, g) for s, g in gaps if s["actor"] != s["critic"] and s["devices"] >= 96]
    if large:
        if all(s["best_fixed"] == "split" for s, _ in large):
            verdict.append("large critic at 96-128 GPUs: split best, as in the paper")
        else:
            verdict.append("large critic at 96-128 GPUs: the simulator keeps colocate (colocate/split "
                           + ", ".join(f"{x(g)} at {s['devices']}" for s, g in large if g is not None)
                           + "), the paper finds split faster")
    if share is not None:
        verdict.append(f"measured: hfrl's pick at {pct(share)} of the fastest placement")
    return measured_text, sim_text, "; ".join(verdict) or "n/a"


def _gap(tokens_per_s: dict) -> float | None:
    """Colocate's throughput over split's (None when either is missing)."""
    c, s = tokens_per_s.get("colocate"), tokens_per_s.get("split")
    return c / s if c and s else None


def row_transition(lines) -> tuple[str, str, str]:
    measured = [l for l in _kind(lines, "measured") if l["mode"] == "hybridflow"]
    measured_text = ("4 ranks, pp1 tp4 -> tg2, hybridflow's transition shorter than hybridflow_v / ds_chat by: " +
                     ", ".join(f"{l['model']} {pct(l['reduction_vs']['hybridflow_v'])} / "
                               f"{pct(l['reduction_vs']['ds_chat'])}" for l in measured) + _errors(lines)
                     if measured else "not run")
    sims = _kind(lines, "simulated")
    sim_text = ("reduction vs hybridflow_v / ds_chat: " + ", ".join(
        f"{s['model']} {pct(s['reduction_vs']['hybridflow_v'])} / {pct(s['reduction_vs']['ds_chat'])}"
        for s in sims)) if sims else "not run"
    verdict = []
    for name, rows, get in (("measured", measured, lambda l: l["reduction_vs"]["hybridflow_v"]),
                            ("simulated", sims, lambda s: s["reduction_vs"]["hybridflow_v"])):
        values = [get(r) for r in rows if get(r) is not None]
        if values:
            mean = statistics.mean(values)
            verdict.append(f"{name} mean reduction vs hybridflow_v {pct(mean)} "
                           f"({100 * (mean - PAPER_TRANSITION_MEAN):+.0f} points vs the paper's 55.2%)")
    big = next((s for s in sims if s["model"] == "70b"), None)
    if big and big["reduction_vs"]["hybridflow_v"] is not None:
        verdict.append(f"70B simulated {pct(big['reduction_vs']['hybridflow_v'])} vs the paper's 89.1%")
    return measured_text, sim_text, "; ".join(verdict) or "n/a"


def row_gen_tp(lines) -> tuple[str, str, str]:
    measured = _kind(lines, "measured")
    verdict = []
    if measured:
        fastest = min(measured, key=lambda l: l["total_s"])
        full = max(measured, key=lambda l: l["tg"])
        measured_text = (f"training tp{full['tg']}, generation + transition: " +
                         ", ".join(f"tg{l['tg']} {l['total_s']:.2f} s" for l in measured) + _errors(lines))
        verdict.append(f"measured: fastest tg{fastest['tg']}, tg = tp is {full['total_s'] / fastest['total_s']:.2f}x "
                       f"slower" + (" (agrees)" if fastest["tg"] < full["tg"] else " (disagrees)"))
    else:
        measured_text = "not run"
    sims = [s for s in _kind(lines, "simulated") if s.get("total_s") is not None]
    parts = []
    for size in dict.fromkeys(s["model"] for s in sims):
        rows = [s for s in sims if s["model"] == size]
        fastest = min(rows, key=lambda s: s["total_s"])
        smallest = min(rows, key=lambda s: s["tg"])
        parts.append(f"{size} ({rows[0]['train']}): fastest tg{fastest['tg']}, tg{smallest['tg']} "
                     f"{smallest['total_s'] / fastest['total_s']:.2f}x slower")
        verdict.append(f"simulated {size}: fastest tg{fastest['tg']}" +
                       (" (agrees)" if fastest["tg"] < max(s["tg"] for s in rows) else " = tp (disagrees)"))
    return measured_text, "; ".join(parts) or "not run", "; ".join(verdict) or "n/a"


def row_scaling(lines) -> tuple[str, str, str]:
    eff = _kind(lines, "measured_efficiency")
    measured_text = (", ".join(f"{e['algorithm']} {e['ranks_min']} -> {e['ranks_max']} ranks: {pct(e['efficiency'])}"
                               for e in eff) + _errors(lines)) if eff else "not run"
    sims = _kind(lines, "simulated")
    values = [s["efficiency"] for s in sims]
    sim_text = (f"hfrl's mapping, fewest -> most GPUs: mean {pct(statistics.mean(values))} (range {span(values, pct)})"
                if values else "not run")
    verdict = []
    if values:
        verdict.append(f"simulated mean {pct(statistics.mean(values))}, "
                       f"{100 * (statistics.mean(values) - PAPER_EFFICIENCY):+.0f} points vs the paper's 66.8%")
    if eff:
        verdict.append(f"measured {pct(eff[0]['efficiency'])} "
                       f"({100 * (eff[0]['efficiency'] - PAPER_EFFICIENCY):+.0f} points)")
    return measured_text, sim_text, "; ".join(verdict) or "n/a"


def row_search(lines) -> tuple[str, str, str]:
    rows = _kind(lines, "search_time")
    if not rows:
        return "not run", "not run", "n/a"
    devices = [r for r in rows if r["series"] == "devices"]
    scaled = [r for r in rows if r["series"] == "scaled"]
    text = ("search time on this machine, PPO 7B: " + ", ".join(f"{r['devices']} GPUs {r['search_s']:.2f} s"
                                                               for r in devices))
    if scaled:
        text += "; scaled: " + ", ".join(f"{r['algorithm']} {r['model']} x{r['devices']} {r['search_s']:.2f} s"
                                         for r in scaled)
    grows = len(devices) > 1 and devices[-1]["search_s"] > devices[0]["search_s"]
    verdict = ("grows with the device count, as in the paper" if grows else "does not grow with the device count")
    if devices:
        verdict += f"; longest {max(r['search_s'] for r in devices):.1f} s at {devices[-1]['devices']} GPUs"
    return text, "the search is the simulator: the times are its own, at paper scale", verdict


ROWS = {"fig09_11_e2e": row_e2e, "fig12_placement": row_placement, "fig14_transition": row_transition,
        "fig15_gen_tp": row_gen_tp, "scaling": row_scaling, "fig16_search_time": row_search}


def build_table(results: dict[str, list[dict]]) -> str:
    out = ["| Figure (HybridFlow, EuroSys 2025) | Measured here (CPU scale) | Simulated at paper scale "
           "(A100-80GB) | Paper vs hfrl |", "|---|---|---|---|"]
    for name in SCRIPTS:
        cells = ROWS[name](results[name]) if name in results else ("not run", "not run", "n/a")
        out.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in (PAPER[name], *cells)) + " |")
    return "\n".join(out)


def rewrite(text: str, table: str) -> str:
    """`text` with the part between the markers replaced by `table`; ValueError without the markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no '{START}' ... '{END}' section to rewrite")
    return text[:start + len(START)] + "\n" + table + "\n" + text[end:]


def update_readme(results: Path, readme: Path) -> str:
    table = build_table(load(results))
    readme.write_text(rewrite(readme.read_text(), table))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--readme", default=str(HERE / "README.md"))
    args = parser.parse_args()
    print(update_readme(Path(args.results), Path(args.readme)))


if __name__ == "__main__":
    main()
