"""benchmarks/paper/: the README table rebuilt from canned JSON lines (numbers computed, markers
honoured), and the simulated parts of the figure scripts on their smallest paper-scale cases
(pure Python, a few seconds; the measured parts need torchrun runs and are not run here)."""
from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[2] / "benchmarks" / "paper"
sys.path.insert(0, str(PAPER))

import table  # noqa: E402
from common import Results  # noqa: E402

CANNED = {
    "fig09_11_e2e": [
        {"kind": "measured", "algorithm": "ppo", "strategy": "hfrl", "ranks": 2, "throughput_tokens_per_s": 150.0},
        {"kind": "measured", "algorithm": "ppo", "strategy": "nemo", "ranks": 2, "throughput_tokens_per_s": 100.0},
        {"kind": "measured", "algorithm": "ppo", "strategy": "ds_chat", "ranks": 2, "throughput_tokens_per_s": 50.0},
        {"kind": "simulated", "algorithm": "ppo", "actor": "7b", "devices": 16,
         "speedup_vs": {"nemo": 1.0, "ds_chat": 1.25, "openrlhf": 2.5}},
        {"kind": "simulated", "algorithm": "ppo", "actor": "7b", "devices": 32,
         "speedup_vs": {"nemo": 1.1, "ds_chat": 1.5, "openrlhf": None}},
    ],
    "fig12_placement": [
        {"kind": "measured", "placement": "colocate", "ranks": 4, "throughput_tokens_per_s": 200.0,
         "mapping": "{actor,ref,critic,reward}x4: ..."},
        {"kind": "measured", "placement": "auto", "ranks": 4, "throughput_tokens_per_s": 150.0,
         "mapping": "{actor,ref}x2 | {critic,reward}x2: ..."},
        {"kind": "simulated", "actor": "13b", "critic": "34b", "devices": 128, "best_fixed": "colocate",
         "tokens_per_s": {"colocate": 120.0, "split": 100.0, "standalone": 80.0, "auto": 120.0}},
    ],
    "fig14_transition": [
        {"kind": "measured", "model": "15m", "mode": "hybridflow",
         "reduction_vs": {"hybridflow_v": 0.75, "ds_chat": 0.5}},
        {"kind": "simulated", "model": "70b", "reduction_vs": {"hybridflow_v": 0.9, "ds_chat": 0.95}},
    ],
    "fig15_gen_tp": [
        {"kind": "measured", "tg": 1, "total_s": 2.0}, {"kind": "measured", "tg": 4, "total_s": 5.0},
        {"kind": "simulated", "model": "7b", "train": "p1t8d2", "tg": 1, "total_s": 30.0},
        {"kind": "simulated", "model": "7b", "train": "p1t8d2", "tg": 8, "total_s": 20.0},
    ],
    "scaling": [
        {"kind": "measured_efficiency", "algorithm": "ppo", "ranks_min": 1, "ranks_max": 2, "efficiency": 0.6},
        {"kind": "simulated", "efficiency": 0.8}, {"kind": "simulated", "efficiency": 1.0},
    ],
}


def _write(folder: Path, lines: dict) -> None:
    for name, rows in lines.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_from_canned_lines(tmp_path):
    _write(tmp_path, CANNED)
    text = table.build_table(table.load(tmp_path))
    assert len(text.splitlines()) == 2 + len(table.SCRIPTS)

    def row(prefix):
        return next(line for line in text.splitlines() if line.startswith(f"| {prefix}"))

    e2e = row("Fig. 9-11")
    assert "NeMo-style: ppo 1.50x" in e2e and "DS-Chat-style: ppo 3.00x" in e2e   # 150/100, 150/50
    assert "vs DS-Chat-style 1.25x-1.50x" in e2e and "vs OpenRLHF-style 2.50x" in e2e
    assert "measured vs NeMo-style 1.50x: below the paper's range (the largest is 98% of its 1.53x)" in e2e
    assert "measured vs DS-Chat-style 3.00x: inside the paper's range" in e2e
    assert "simulated vs DS-Chat-style 1.25x-1.50x: below" in e2e and "simulated vs OpenRLHF-style 2.50x: inside" in e2e
    placement = row("Fig. 12")
    assert "Fastest: colocate" in placement and "reaches 75% of it" in placement
    assert "13b/34b x128: best of the three colocate; colocate/split throughput 1.20x" in placement
    assert "the simulator keeps colocate (colocate/split 1.20x at 128)" in placement
    transition = row("Fig. 14")
    assert "15m 75% / 50%" in transition and "+20 points vs the paper's 55.2%" in transition
    assert "70B simulated 90% vs the paper's 89.1%" in transition
    gen = row("Fig. 15")
    assert "fastest tg1, tg = tp is 2.50x slower (agrees)" in gen and "fastest tg8 = tp (disagrees)" in gen
    scaling = row("Sec. 8.2")
    assert "ppo 1 -> 2 ranks: 60%" in scaling and "simulated mean 90%, +23 points" in scaling
    assert row("Fig. 16").count("not run") == 2   # no canned lines for it


def test_readme_rewrite_between_markers(tmp_path):
    _write(tmp_path, CANNED)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.START}\nold table\n{table.END}\nafter\n")
    table.update_readme(tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{table.END}\nafter\n") and "old table" not in text
    assert "NeMo-style: ppo 1.50x" in text
    table.update_readme(tmp_path, readme)   # idempotent: the same text again
    assert readme.read_text() == text
    with pytest.raises(ValueError, match="paper-table"):
        table.rewrite("no markers here", "| table |")


def test_simulated_parts_at_paper_scale(tmp_path):
    import fig12_placement
    import fig14_transition
    import fig15_gen_tp
    import fig16_search_time
    from strategies import paper_case

    from hfrl.mapping import ModelSpec, Planner, TrainLayout, GenLayout, Workload, get_profile, transition_bytes

    device = get_profile("a100-80gb")
    case = paper_case("ppo", "7b", "7b", 16, device, Planner(Workload.paper("ppo", "7b"), device))
    # every baseline mapping lies in the search space, so the searched one is never slower
    assert all(v is None or v >= 1 - 1e-9 for v in case["speedup_vs"].values()), case
    assert case["iteration_s"]["ds_chat"] >= case["iteration_s"]["nemo"]   # same mapping, more to gather
    results = Results("check", tmp_path)
    fig14_transition.simulated(results, fig14_transition.SIM_CASES[:1])
    line = results.lines[-1]
    train = TrainLayout(*(int(part) for part in line["train"][1:].replace("t", " ").replace("d", " ").split()))
    gen = GenLayout(*(int(part) for part in line["gen"][2:].replace("tg", " ").split()))
    m = ModelSpec.from_name("7b").param_bytes()
    assert line["bytes_per_rank"]["hybridflow"] == transition_bytes(ModelSpec.from_name("7b"), train, gen)
    assert line["bytes_per_rank"]["hybridflow"] == int(Fraction(train.tp * train.pp - gen.tg * gen.pg,
                                                                gen.tg * gen.pg * train.tp * train.pp) * m)
    assert line["seconds"]["hybridflow"] < line["seconds"]["hybridflow_v"] <= line["seconds"]["ds_chat"]
    fig15_gen_tp.simulated(results, fig15_gen_tp.SIM_CASES[:1])
    tgs = [l["tg"] for l in results.lines if l.get("model") == "7b" and "tg" in l]
    assert tgs == [1, 2, 4, 8]
    fig12_placement.simulated(results, fig12_placement.QUICK_SIM_CASES)
    assert results.lines[-1]["tokens_per_s"]["auto"] >= max(v for v in results.lines[-1]["tokens_per_s"].values()
                                                            if v is not None) - 1e-9
    fig16_search_time.devices_series(results, (8,))
    assert results.lines[-1]["devices"] == 8 and results.lines[-1]["search_s"] >= 0
    results.close()
    assert len((tmp_path / "check.jsonl").read_text().splitlines()) == len(results.lines)


def test_runnable_generates_with_one_stage():
    from strategies import runnable

    from hfrl.mapping import GenLayout, Mapping, RolePlan, TrainLayout, Workload, get_profile

    device = get_profile("a100-80gb")
    w = Workload.paper("ppo", "7b")
    roles = ("actor", "ref", "critic", "reward")

    def mapping(actor_train, actor_gen):
        return Mapping((roles,), (16,), tuple(RolePlan(r, 16, actor_train if r == "actor" else TrainLayout(1, 4, 4),
                                                       actor_gen if r == "actor" else None) for r in roles))

    fine = mapping(TrainLayout(1, 8, 2), GenLayout(1, 4))
    assert runnable(w, fine, device) == (fine, None)
    staged, note = runnable(w, mapping(TrainLayout(2, 4, 2), GenLayout(2, 4)), device)
    actor = staged.plan("actor")
    assert actor.train == TrainLayout(2, 4, 2) and actor.gen.pg == 1 and "pg = 1" in note
    nemo, _ = runnable(w, mapping(TrainLayout(2, 4, 2), GenLayout(2, 4)), device, gen_in_train=True)
    actor = nemo.plan("actor")
    assert actor.train.pp == 1 and actor.gen == GenLayout(1, actor.train.tp)


def test_run_all_only_keeps_the_other_scripts_wall_times(tmp_path):
    """`run_all.py --only X` rewrites run_all.jsonl: the other scripts' lines survive, X's and the
    old total go, and the calibration line stays only when its profile is reused."""
    import run_all

    log = tmp_path / "run_all.jsonl"
    lines = [{"figure": "run_all", "kind": "wall_time", "script": s, "seconds": 1.0}
             for s in ("calibrate", "fig09_11_e2e", "fig14_transition", "fig16_search_time", "total")]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    kept = [json.loads(line)["script"] for line in run_all._kept_records(log, ["fig14_transition"], True)]
    assert kept == ["calibrate", "fig09_11_e2e", "fig16_search_time"]
    kept = [json.loads(line)["script"] for line in run_all._kept_records(log, ["fig09_11_e2e"], False)]
    assert kept == ["fig14_transition", "fig16_search_time"]
    assert run_all._kept_records(tmp_path / "absent.jsonl", ["fig14_transition"], True) == []
