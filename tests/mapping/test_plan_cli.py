"""`hfrl plan`: the ranked mappings, the written plan that `hfrl layout` accepts as is, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def hfrl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hfrl.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"hfrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_plan_writes_a_config_that_layout_accepts(tmp_path):
    out = tmp_path / "plan.yaml"
    result = hfrl("plan", "--algo", "ppo", "--model-size", "7b", "--devices", "16", "--json", "--out", str(out),
                  "--top-k", "3")
    report = json.loads(result.stdout)
    ranked = report["mappings"]
    assert 1 <= len(ranked) <= 3 and ranked[0]["total_s"] <= ranked[-1]["total_s"]
    best = ranked[0]
    assert sum(best["allocation"]) == 16
    assert sorted(r for s in best["placement"] for r in s) == ["actor", "critic", "ref", "reward"]
    config = yaml.safe_load(out.read_text())
    assert config["placement"]["mode"] == "custom" and config["distributed"]["world_size"] == 16
    for role, plan in best["plans"].items():
        entry = config["roles"][role]
        assert (entry["pp"], entry["tp"], entry["dp"]) == (plan["pp"], plan["tp"], plan["dp"])
        assert len(config["placement"]["pools"][entry["pool"]]) == plan["devices"]
    layout = json.loads(hfrl("layout", str(out), "--world-size", "16", "--json").stdout)
    assert layout["plan"]["world_size"] == 16
    assert set(layout["plan"]["roles"]) == {"actor", "critic", "ref", "reward"}


def test_plan_text_lists_the_best_with_its_stages():
    text = hfrl("plan", "--algo", "grpo", "--model-size", "1.3b", "--devices", "8", "--n", "4").stdout
    assert " best " in text and "s/iteration" in text and "stages: gen" in text


@pytest.mark.parametrize("args,match", [
    (["--devices", "12"], "multiple of"),
    (["--model-size", "70b", "--devices", "1"], "70b"),
    (["--model-size", "13x"], "13x"),
    (["--algo", "dpo"], "dpo"),
])
def test_plan_bad_input(args, match):
    result = hfrl("plan", *(["--devices", "16"] if "--devices" not in args else []), *args, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert match in result.stderr and result.stderr.startswith("hfrl plan: error"), result.stderr


def test_plan_time_shared_on_a_cpu_profile(tmp_path, capsys):
    """--time-shared with a CPU profile (2 cores) and 4 ranks lists what search(time_shared=True) ranks."""
    import dataclasses

    from hfrl.cli import main, plan_workload
    from hfrl.mapping import get_profile, save_profile, search

    cpu = dataclasses.replace(get_profile("a100-80gb"), name="cpu", devices_per_node=2, peak_flops=5e10,
                              mem_bandwidth=1e10, intra_node_bandwidth=5e9)
    save_profile(cpu, str(tmp_path / "cpu.json"))
    args = ["plan", "--algo", "ppo", "--model-size", "1.3b", "--devices", "4", "--device", str(tmp_path / "cpu.json"),
            "--prompt-len", "8", "--response-len", "32", "--num-prompts", "16", "--json", "--top-k", "3",
            "--time-shared"]
    assert main(args) == 0
    listed = json.loads(capsys.readouterr().out)["mappings"]
    ns = build_parser_namespace(args)
    expected = search(plan_workload(ns), 4, cpu, top_k=3, time_shared=True)
    assert [m["total_s"] for m in listed] == [e.total_s for e in expected]
    assert [m["describe"] for m in listed] == [e.mapping.describe() for e in expected]


def build_parser_namespace(args):
    from hfrl.cli import build_parser

    return build_parser().parse_args(args)
