"""The auto-mapping simulator's predictions against measured `hfrl train` iterations on this machine.

    python benchmarks/e2e_throughput.py --only ppo > e2e.jsonl      # measure (2 and 4 ranks, colocate/split)
    python benchmarks/mapping_validation.py --measured e2e.jsonl     # calibrate, predict, compare

For each measured PPO case the same mapping (every role's layout as hfrl ran it) is simulated with
this machine's calibrated profile (`hfrl.mapping.calibrate`) and the workload of that run (the
example policy's shape, its measured prompt and response lengths, 16 prompts); one JSON line per
case with the predicted and measured iteration seconds and the relative error (the issue's goal:
within 25%). The 4-rank cases oversubscribe a 2-core machine, which the profile does not model.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mapping_for(ranks: int, placement: str):
    from hfrl.mapping import GenLayout, Mapping, RolePlan, TrainLayout

    def plan(role, n):
        return RolePlan(role, n, TrainLayout(1, 1, n), GenLayout(1, 1) if role == "actor" else None)

    if placement == "colocate":
        roles = ("actor", "ref", "critic", "reward")
        return Mapping((roles,), (ranks,), tuple(plan(r, ranks) for r in roles))
    half = ranks // 2
    return Mapping((("actor", "ref"), ("critic", "reward")), (half, half),
                   tuple(plan(r, half) for r in ("actor", "ref", "critic", "reward")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", required=True, help="JSON lines of benchmarks/e2e_throughput.py")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from examples.make_example_assets import write_models

    from hfrl.mapping import ModelSpec, Workload, calibrate, simulate

    assets = Path(tempfile.mkdtemp(prefix="hfrl-validation-"))
    write_models(assets)
    policy = ModelSpec.from_hf_config(str(assets / "policy"))
    tiny_reward = ModelSpec("rule", 1, 8, 8, 1, 1, policy.vocab_size).as_value_model()   # a rule reward: ~free
    device = calibrate()
    print(json.dumps({"line": "profile", **device.to_dict()}), flush=True)
    for line in Path(args.measured).read_text().splitlines():
        row = json.loads(line)
        if row.get("algorithm") != "ppo" or "iteration_s" not in row:
            continue
        response_len = max(1, round(row["response_length_mean"]))
        prompt_len = max(1, round(row["tokens_per_iteration"] / 16 - row["response_length_mean"]))
        workload = Workload("ppo", {"actor": policy, "ref": policy, "critic": policy.as_value_model(),
                                    "reward": tiny_reward}, prompt_len=prompt_len, response_len=response_len,
                            num_prompts=16)
        estimate = simulate(workload, mapping_for(row["ranks"], row["placement"]), device)
        error = estimate.total_s / row["iteration_s"] - 1
        print(json.dumps({"line": "validation", "ranks": row["ranks"], "placement": row["placement"],
                          "measured_s": row["iteration_s"], "predicted_s": estimate.total_s,
                          "relative_error": error, "predicted_stages_s": estimate.stages,
                          "measured_stages_s": row["timing_s"]}), flush=True)


if __name__ == "__main__":
    main()
