"""The auto-mapping simulator's predictions against measured `hfrl train` iterations on this machine.

    python benchmarks/mapping_validation.py                          # measure, calibrate, predict
    python benchmarks/mapping_validation.py --measured out.jsonl     # replay the measured lines of a run
                                                                     # (or e2e_throughput.py's), calibrate again

1. Measure: `benchmarks/e2e_throughput.py --only ppo` (PPO, 2 and 4 ranks, colocate and split, one
   thread per rank, the example policy and critic, a rule reward, 16 prompts, mini-batch 8).
2. Calibrate: `hfrl.mapping.calibrate(threads=1)` measures this machine's roofs, its gloo links and
   the fixed costs of hfrl's own passes, decode steps, optimizer steps and controller calls on two
   probe models (1 and 4 layers, hidden 32): not the models of step 1.
3. Predict: each measured case's mapping (every role's layout as hfrl ran it) is simulated with that
   profile and the case's workload: the example models' shapes, its measured mean prompt length and
   its longest response (every response runs to it in the simulator), 16 prompts, mini-batch 8, one
   micro-batch per pass. The rule reward (scored on the actor's ranks) is a 1-layer, width-8 model on
   the actor's set. With more ranks than cores the simulator time-shares the cores
   (`simulate(..., cores=)`: a stage slows by the ranks busy beside it over the cores, a waiting rank
   leaving its core to the others).

One JSON line per case: predicted and measured seconds per iteration, the relative error (the
issue's goal: within 25%), and both per-stage breakdowns (measured `timing_s` are the workers' own
times; the predicted stages include the controller call). A last `summary` line gives the largest
error. The profile is printed first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS, MINI_BATCH = 16, 8   # benchmarks/e2e_throughput.py's data.train_batch_size and mini_batch_size
GOAL = 0.25


def mapping_for(ranks: int, placement: str):
    """hfrl's placement as the simulator's mapping: colocate = every role on every rank; split = actor
    and reference (and the rule reward, scored on the actor's ranks) | critic, half the ranks each;
    every layout pure data parallel, as e2e_throughput.py runs them."""
    from hfrl.mapping import GenLayout, Mapping, RolePlan, TrainLayout

    def plan(role, n):
        return RolePlan(role, n, TrainLayout(1, 1, n), GenLayout(1, 1) if role == "actor" else None)

    if placement == "colocate":
        roles = ("actor", "ref", "critic", "reward")
        return Mapping((roles,), (ranks,), tuple(plan(r, ranks) for r in roles))
    half = ranks // 2
    sets = (("actor", "ref", "reward"), ("critic",))
    return Mapping(sets, (half, half), tuple(plan(r, half) for r in ("actor", "ref", "critic", "reward")))


def measure() -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_throughput.py"), "--only", "ppo"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"e2e_throughput.py failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", default=None, help="JSON lines of benchmarks/e2e_throughput.py "
                                                         "(default: run its PPO cases now)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from examples.make_example_assets import write_models
    from transformers.utils import logging as hf_logging

    from hfrl.mapping import ModelSpec, Workload, calibrate, simulate

    if args.measured:
        rows = [json.loads(line) for line in Path(args.measured).read_text().splitlines() if line.startswith("{")]
    else:
        rows = measure()
    rows = [r for r in rows if r.get("algorithm") == "ppo" and "iteration_s" in r]
    if not rows:
        raise SystemExit("no measured PPO iterations to compare with")
    for row in rows:  # kept in the output, so that --measured can replay a run
        print(json.dumps({**row, "line": "measured"}), flush=True)
    assets = Path(tempfile.mkdtemp(prefix="hfrl-validation-"))
    hf_logging.disable_progress_bar()
    write_models(assets)
    policy = ModelSpec.from_hf_config(str(assets / "policy"))
    rule_reward = ModelSpec("rule", 1, 8, 8, 1, 1, policy.vocab_size).as_value_model()
    device = calibrate(threads=1)
    cores = os.cpu_count() or 1
    print(json.dumps({"line": "profile", "cores": cores, **device.to_dict()}), flush=True)
    errors = []
    for row in rows:
        response_len = max(1, round(row["response_length_max"]))
        prompt_len = max(1, round(row["tokens_per_iteration"] / NUM_PROMPTS - row["response_length_mean"]))
        workload = Workload("ppo", {"actor": policy, "ref": policy, "critic": policy.as_value_model(),
                                    "reward": rule_reward}, prompt_len=prompt_len, response_len=response_len,
                            num_prompts=NUM_PROMPTS, mini_batch_size=MINI_BATCH, micro_batches=1)
        estimate = simulate(workload, mapping_for(row["ranks"], row["placement"]), device, cores=cores)
        error = estimate.total_s / row["iteration_s"] - 1
        errors.append(error)
        print(json.dumps({"line": "validation", "ranks": row["ranks"], "placement": row["placement"],
                          "cores": cores, "measured_s": round(row["iteration_s"], 4),
                          "predicted_s": round(estimate.total_s, 4), "relative_error": round(error, 3),
                          "within_goal": abs(error) <= GOAL,
                          "predicted_stages_s": {k: round(v, 4) for k, v in estimate.stages.items()},
                          "measured_stages_s": row["timing_s"]}), flush=True)
    print(json.dumps({"line": "summary", "cases": len(errors), "max_abs_error": round(max(map(abs, errors)), 3),
                      "mean_abs_error": round(sum(map(abs, errors)) / len(errors), 3),
                      "within_goal": sum(abs(e) <= GOAL for e in errors), "goal": GOAL}), flush=True)


if __name__ == "__main__":
    main()
