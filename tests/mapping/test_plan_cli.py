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
