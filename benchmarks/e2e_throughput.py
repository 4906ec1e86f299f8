"""End-to-end RL throughput: the paper's metric, (prompt + response tokens) / seconds of one iteration.

    python benchmarks/e2e_throughput.py             # every case below, one JSON line each
    python benchmarks/e2e_throughput.py --quick     # fewer iterations, for a smoke test

Cases: PPO, ReMax, Safe-RLHF and GRPO on 2 and 4 ranks (torchrun, gloo, 1 thread per rank), with
every role colocated, and split (actor + reference | critic + reward + cost) for the algorithms
that have a critic side. Models: the example assets (examples/make_example_assets.py: a 2-layer
Qwen2-shaped policy, Llama reward and cost models); 16 prompts of the "add" task, rule reward
where no reward model is configured; every role trains on packed micro-batches
(engine.pack_sequences: ragged responses, no padding computed). Each line: the mean throughput over the iterations after the
first (warm-up), and the mean of every `timing_s/*` the trainer logs (where an iteration goes).

The `grpo_17m` case is the issue's MFU case: a ~17.7M-parameter Llama (hidden 512, 6 layers, GQA),
16 prompts x 4 samples, at most 64 new tokens, no reference model (kl_coef 0) on 2 ranks. Its
model-FLOP utilisation counts 2N FLOPs per generated token and 6N per trained token against the
matmul roof the same ranks measure at start (fp32 GEMMs of the model's shapes, every rank at once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (name, algorithm, ranks, placement)
    ("ppo", "ppo", 2, "colocate"), ("ppo", "ppo", 2, "split"), ("ppo", "ppo", 4, "colocate"),
    ("ppo", "ppo", 4, "split"), ("remax", "remax", 2, "colocate"), ("remax", "remax", 4, "colocate"),
    ("safe_rlhf", "safe_rlhf", 2, "colocate"), ("safe_rlhf", "safe_rlhf", 4, "split"),
    ("grpo", "grpo", 2, "colocate"), ("grpo", "grpo", 4, "colocate"), ("grpo_17m", "grpo", 2, "colocate"),
]


def case_config(name: str, algorithm: str, placement: str, assets: Path, run_dir: Path, steps: int):
    from hfrl.config import Config, from_dict

    critic = algorithm in ("ppo", "safe_rlhf")
    n = 4 if algorithm == "grpo" else 1
    data = {
        # packed micro-batches: rows of ragged responses compute no padding
        "engine": {"model_path": str(assets / "policy"), "optim": {"lr": 1e-4, "weight_decay": 0.0},
                   "pack_sequences": True},
        "data": {"train_files": [str(assets / "add_train.jsonl")], "max_prompt_length": 16,
                 "train_batch_size": 16, "reward_fn": "examples.reward_fns:exact_answer"},
        "placement": {"mode": placement},
        "roles": {"critic": {"enabled": critic}, "reward": {"enabled": False}},
        "rollout": {"n": n, "max_new_tokens": 16, "kv_cache_bytes": 1 << 26},
        "algorithm": {"name": algorithm, "mini_batch_size": 8, "kl_coef": 0.01},
        "trainer": {"total_steps": steps, "run_dir": str(run_dir), "progress_bar": False, "export_hf": False,
                    "keep_checkpoints": 1},
    }
    if algorithm == "safe_rlhf":
        data["data"].pop("reward_fn")
        data["roles"].update({"reward": {"engine": {"model_path": str(assets / "reward")}},
                              "critic": {"engine": {"model_path": str(assets / "reward")}},
                              "cost": {"enabled": True, "engine": {"model_path": str(assets / "cost")}}})
    if name == "grpo_17m":
        data["engine"]["model_path"] = str(assets / "llama17m")
        data["roles"]["ref"] = {"enabled": False}
        data["algorithm"].update(kl_coef=0.0, mini_batch_size=16)
        data["rollout"].update(max_new_tokens=64, n=4)
    config = from_dict(Config, data)
    config.validate(training=True)
    return config


def write_17m(assets: Path) -> int:
    """The MFU case's model: ~17M parameters over the task tokenizer. Returns N."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfrl.data import get_task

    tok = get_task("add").tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = assets / "llama17m"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matmul_roof(seconds: float = 2.0) -> float:
    """FLOP/s of this process on fp32 GEMMs of a 17M model's training shapes."""
    import torch

    a, b = torch.randn(1024, 512), torch.randn(512, 1408)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * 1024 * 512 * 1408 * count / (time.perf_counter() - start)


def _main_worker(config) -> dict:
    """Rank 0's program: run the trainer, then summarise its metrics."""
    from hfrl.trainers import TRAINERS

    return TRAINERS[config.algorithm.name](config).fit()


def worker(args) -> None:
    """Under torchrun: every rank measures its matmul roof at once, then the job runs."""
    import torch
    import torch.distributed as dist

    import hfrl
    from hfrl.trainers.job import check_job

    sys.path.insert(0, str(ROOT))
    assets, run_dir = Path(args.assets), Path(args.run_dir)
    config = case_config(args.case, args.algorithm, args.placement, assets, run_dir, args.steps)
    check_job(config)
    dist.init_process_group("gloo")
    roof = torch.tensor([matmul_roof() if args.case == "grpo_17m" else 0.0], dtype=torch.float64)
    dist.all_reduce(roof)
    summary = hfrl.run(_main_worker, config, config=config)
    if dist.get_rank() == 0:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print("RESULT " + json.dumps({"rows": rows, "roof_flops": float(roof), "transport": summary["transport"]}),
              flush=True)


def summarise(name, algorithm, ranks, placement, result, num_params) -> dict:
    rows = result["rows"][1:] or result["rows"]   # the first iteration is warm-up
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    out = {"case": name, "algorithm": algorithm, "ranks": ranks, "placement": placement,
           "iterations": len(rows), "throughput_tokens_per_s": mean("perf/throughput"),
           "throughput_per_rank": mean("perf/throughput_per_rank"),
           "iteration_s": mean("timing_s/step"), "tokens_per_iteration": mean("perf/total_tokens"),
           "response_length_mean": mean("response_length/mean"), "response_length_max": mean("response_length/max"),
           "rank0_payload_recv_bytes": result["transport"]["payload_recv"]}
    keys = sorted({k for r in rows for k in r if k.startswith(("timing_s/", "hybrid/timing_s"))})
    out["timing_s"] = {k.rsplit("/", 1)[1]: round(mean(k), 4) for k in keys}
    if num_params:
        generated = mean("response_length/mean") * mean("perf/num_sequences")
        trained = mean("perf/total_tokens")
        flops = 2 * num_params * generated + 6 * num_params * trained
        out.update(num_params=num_params, model_flops_per_iteration=flops, roof_flops=result["roof_flops"],
                   mfu=flops / mean("timing_s/step") / result["roof_flops"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 iterations per case instead of 6")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    for hidden in ("--worker", "--case", "--algorithm", "--placement", "--assets", "--run-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, **({"action": "store_true"} if hidden == "--worker" else {}))
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    from examples.make_example_assets import write_models, write_prompts

    steps = args.steps or (3 if args.quick else 6)
    assets = Path(tempfile.mkdtemp(prefix="hfrl-e2e-assets-"))
    write_models(assets)
    write_prompts(assets)
    num_params_17m = write_17m(assets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    for port, (name, algorithm, ranks, placement) in enumerate(CASES, start=29650):
        if args.only and args.only not in name:
            continue
        run_dir = Path(tempfile.mkdtemp(prefix=f"hfrl-e2e-{name}-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(port), __file__, "--worker", "--case", name, "--algorithm", algorithm, "--placement", placement,
               "--assets", str(assets), "--run-dir", str(run_dir), "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(json.dumps({"case": name, "ranks": ranks, "placement": placement, "error": proc.stderr[-2000:]}),
                  flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(summarise(name, algorithm, ranks, placement, result,
                                   num_params_17m if name == "grpo_17m" else 0)), flush=True)


if __name__ == "__main__":
    main()
