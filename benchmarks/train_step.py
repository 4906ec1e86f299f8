"""Training-step throughput of TrainEngine under several (pp, tp, dp) layouts, against the machine's roof.

    python benchmarks/train_step.py            # every layout, ~20M-parameter Llama
    python benchmarks/train_step.py --quick    # smoke test: small batch, one timed step per layout

It launches its own processes (one spawn per layout, gloo, CPU) and prints JSON lines:

- one ``env`` line: the compute roof, the fp32 FLOP/s of 2048 x 2048 matmuls measured here with all
  cores (``roof_flops``) and with one thread (``roof_flops_1thread``), torch version, core count;
- one line per layout: ``tokens_per_s`` and ``achieved_flops`` of ``TrainEngine.train_step`` (median
  step time over the timed steps, each step bracketed by barriers), ``fraction_of_roof`` =
  achieved_flops / roof_flops, and the 1-minute load average before the case (other jobs on a
  shared machine show up there);
- one ``env_end`` line: the roof measured again after the last case, to show how much it drifted.

FLOPs are counted as ``6 * N * tokens`` for forward + backward, N = parameters that take part in
matmuls (every parameter except the input embedding, whose lookup multiplies nothing; the tied
LM head counts once). Attention's own T^2 work (12 * layers * hidden * T per token) is left out,
about 6% at T = 256. Ranks pin ``torch.set_num_threads(max(1, cores // ranks))``: with 2 cores one
rank gets 2 threads and 2 or 4 ranks get 1 thread each, so 4 ranks are oversubscribed two to one
(``oversubscribed`` in the JSON); their numbers measure the code's overheads, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback

import torch

MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)
"""~21.6M parameters (GQA, tied embeddings)."""
LAYOUTS = [  # (name, ranks, layout)
    ("dp1", 1, dict()),
    ("dp2", 2, dict()),
    ("tp2", 2, dict(tp=2)),
    ("pp2", 2, dict(pp=2)),
    ("dp4", 4, dict()),
    ("tp2_dp2", 4, dict(tp=2)),
    ("pp2_tp2", 4, dict(pp=2, tp=2)),
]
FULL = dict(num_seqs=16, seq_len=256, num_micro_batches=4, warmup=1, steps=4)
QUICK = dict(num_seqs=8, seq_len=64, num_micro_batches=2, warmup=1, steps=1)


def measure_roof(threads: int, n: int = 2048, reps: int = 8) -> float:
    """fp32 matmul FLOP/s of an n x n x n product with ``threads`` threads (median of ``reps``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * n**3 / statistics.median(times)


def save_model(path: str) -> tuple[int, int]:
    """A random Llama saved as a HF checkpoint; returns (all parameters, matmul parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    model.save_pretrained(path)
    total = sum(p.numel() for p in model.parameters())  # a tied head counts once
    matmul = total - (0 if MODEL["tie_word_embeddings"] else model.get_input_embeddings().weight.numel())
    return total, matmul


# ---- one rank ----------------------------------------------------------------------------------------


def rank_main(rank: int, world_size: int, port: int, threads: int, path: str, layout: dict, sizes: dict,
              results) -> None:
    try:
        torch.set_num_threads(threads)
        import torch.distributed as dist

        from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
        from hfrl.engine import EngineConfig, OptimConfig, TrainEngine

        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        dims = ParallelDims.create(world_size, **layout)
        groups = build_groups("actor", dims, tuple(range(world_size)), rank, GroupCache())
        cfg = EngineConfig(model_path=path, optim=OptimConfig(lr=1e-4),
                           num_micro_batches=sizes["num_micro_batches"])
        engine = TrainEngine(cfg, groups)
        per_rank = sizes["num_seqs"] // dims.dp
        gen = torch.Generator().manual_seed(engine.dp_rank)
        ids = torch.randint(0, MODEL["vocab_size"], (per_rank, sizes["seq_len"]), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def loss_fn(logits, mb):
            mask = mb["loss_mask"][:, 1:].float()
            return -(engine.token_log_probs(logits, mb["input_ids"]) * mask).sum() / mask.sum(), {}

        times = []
        for i in range(sizes["warmup"] + sizes["steps"]):
            dist.barrier()
            start = time.perf_counter()
            engine.train_step(batch, loss_fn)
            dist.barrier()
            if i >= sizes["warmup"]:
                times.append(time.perf_counter() - start)
        results.put((rank, True, times))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_case(world_size: int, threads: int, path: str, layout: dict, sizes: dict, timeout: float = 600) -> list[float]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the children's OpenMP at start-up
    procs = [ctx.Process(target=rank_main, args=(r, world_size, port, threads, path, layout, sizes, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    except queue.Empty:
        raise RuntimeError(f"layout {layout} on {world_size} ranks did not finish in {timeout} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, one timed step per layout")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    cores = os.cpu_count() or 1
    roof = measure_roof(cores)
    roof_1 = measure_roof(1)
    print(json.dumps({"case": "env", "roof_flops": roof, "roof_flops_1thread": roof_1, "roof_matmul": "fp32 2048^3",
                      "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
                      "quick": args.quick}), flush=True)
    tmp = tempfile.mkdtemp(prefix="hfrl-bench-")
    try:
        path = os.path.join(tmp, "model")
        num_params, flop_params = save_model(path)
        tokens = sizes["num_seqs"] * sizes["seq_len"]
        for name, world_size, layout in LAYOUTS:
            threads = max(1, cores // world_size)
            load = os.getloadavg()[0]
            times = run_case(world_size, threads, path, layout, sizes)
            step_s = statistics.median(times)
            achieved = 6 * flop_params * tokens / step_s
            print(json.dumps({
                "case": name, "ranks": world_size, "pp": layout.get("pp", 1), "tp": layout.get("tp", 1),
                "dp": world_size // (layout.get("pp", 1) * layout.get("tp", 1)), "threads_per_rank": threads,
                "oversubscribed": world_size * threads > cores, "params": num_params, "flop_params": flop_params,
                "global_batch_seqs": sizes["num_seqs"], "seq_len": sizes["seq_len"],
                "micro_batches_per_dp_rank": sizes["num_micro_batches"], "tokens_per_step": tokens,
                "step_s_median": round(step_s, 4), "step_s_min": round(min(times), 4),
                "step_s_all": [round(t, 4) for t in times], "loadavg_1m_before": round(load, 2),
                "tokens_per_s": round(tokens / step_s, 1), "achieved_flops": achieved,
                "fraction_of_roof": round(achieved / roof, 4), "flops_formula": "6 * flop_params * tokens"}),
                flush=True)
        print(json.dumps({"case": "env_end", "roof_flops": measure_roof(cores), "roof_flops_1thread": measure_roof(1),
                          "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
