"""Training-step throughput of TrainEngine under several (pp, tp, dp) layouts, against the machine's roof.

    python benchmarks/train_step.py                      # every case, ~20M-parameter Llama
    python benchmarks/train_step.py --quick              # smoke test: small batch, one timed step per case
    python benchmarks/train_step.py --case dp1_packed    # only the named case(s) (repeat --case for more)

It launches its own processes (one spawn per layout, gloo, CPU) and prints JSON lines:

- one ``env`` line: the compute roof, the fp32 FLOP/s of 2048 x 2048 matmuls measured here with all
  cores (``roof_flops``) and with one thread (``roof_flops_1thread``), torch version, core count;
- one line per layout: ``tokens_per_s`` and ``achieved_flops`` of ``TrainEngine.train_step`` (median
  step time over the timed steps, each step bracketed by barriers), ``fraction_of_roof`` =
  achieved_flops / roof_flops, and the 1-minute load average before the case (other jobs on a
  shared machine show up there);
- one ``env_end`` line: the roof measured again after the last case, to show how much it drifted.

Every case line also reports memory: ``rss_before_steps_mb`` (rank 0's resident set after building
the engine) and ``peak_rss_steps_mb`` (its peak while the steps run, sampled every 2 ms).

The ``dp1_packed`` case trains packed sequences (``pack_sequences=True``): 16 sequences of random
lengths in [seq_len / 4, seq_len], a micro-batch being one row of about 8 * 5/8 * seq_len tokens,
so attention cost and memory per pack show up (the other cases train full-length padded rows).
Its ``tokens_per_step`` counts real tokens only.

The ``*_overlap`` cases measure ``EngineConfig.overlap_grad_reduce``: each rank builds two engines,
the DP gradient reduction after backward (off) and overlapped with the last backward (on), and
alternates their steps, so both see the same machine load. Their line adds ``step_s_median_off``,
``step_s_median_on`` and ``ratio_on_off`` (< 1: overlap is faster); the other fields are the off engine's.

FLOPs are counted as ``6 * N * tokens`` for forward + backward, N = parameters that take part in
matmuls (every parameter except the input embedding, whose lookup multiplies nothing; the tied
LM head counts once). Attention's own T^2 work (12 * layers * hidden * T per token) is left out,
about 6% at T = 256. Ranks pin ``torch.set_num_threads(max(1, cores // ranks))``: with 2 cores one
rank gets 2 threads and 2 or 4 ranks get 1 thread each, so 4 ranks are oversubscribed two to one
(``oversubscribed`` in the JSON); their numbers measure the code's overheads, not a speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
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
import threading
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
    ("dp1_packed", 1, dict()),
    ("dp2_overlap", 2, dict()),
    ("tp2_dp2_overlap", 4, dict(tp=2)),
]
FULL = dict(num_seqs=16, seq_len=256, num_micro_batches=4, warmup=1, steps=4)
QUICK = dict(num_seqs=8, seq_len=64, num_micro_batches=2, warmup=1, steps=1)
PACKED = {"full": dict(num_seqs=16, seq_len=512, num_micro_batches=2, warmup=1, steps=3, packed=True),
          "quick": dict(num_seqs=8, seq_len=128, num_micro_batches=2, warmup=1, steps=1, packed=True)}
"""Sizes of the packed case (its name ends in "_packed")."""
OVERLAP = dict(overlap=[False, True], steps=6)
"""Added to the sizes of a case whose name ends in "_overlap": one engine per overlap_grad_reduce value."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident set size of this process while the ``with`` block runs (a sampling thread)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


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
        packed = sizes.get("packed", False)
        cfg = EngineConfig(model_path=path, optim=OptimConfig(lr=1e-4),
                           num_micro_batches=sizes["num_micro_batches"], pack_sequences=packed)
        overlaps = sizes.get("overlap", [cfg.overlap_grad_reduce])  # one engine each, steps alternate
        engines = [TrainEngine(dataclasses.replace(cfg, overlap_grad_reduce=o), groups) for o in overlaps]
        engine = engines[0]
        per_rank = sizes["num_seqs"] // dims.dp
        gen = torch.Generator().manual_seed(engine.dp_rank)
        T = sizes["seq_len"]
        ids = torch.randint(0, MODEL["vocab_size"], (per_rank, T), generator=gen)
        mask = torch.ones_like(ids)
        if packed:  # right-padded rows of random lengths in [T/4, T]
            lengths = torch.randint(T // 4, T + 1, (per_rank,), generator=gen)
            mask = (torch.arange(T)[None] < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask}

        def loss_fn(logits, mb):
            mask = mb["loss_mask"][:, 1:].float()
            return -(engine.token_log_probs(logits, mb["input_ids"]) * mask).sum() / mask.sum(), {}

        times = [[] for _ in engines]
        rss_before = rss_bytes()
        with PeakRss() as peak:
            for i in range(sizes["warmup"] + sizes["steps"]):
                for engine_times, engine in zip(times, engines):
                    dist.barrier()
                    start = time.perf_counter()
                    engine.train_step(batch, loss_fn)
                    dist.barrier()
                    if i >= sizes["warmup"]:
                        engine_times.append(time.perf_counter() - start)
        results.put((rank, True, {"times": times[0], "times_by_engine": times, "tokens": int(mask.sum()) * dims.dp,
                                  "rss_before": rss_before, "peak_rss": peak.peak}))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_case(world_size: int, threads: int, path: str, layout: dict, sizes: dict, timeout: float = 600) -> dict:
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


def overlap_fields(sizes: dict, measured: dict) -> dict:
    """Median step time of each engine of an ``*_overlap`` case, and on / off; nothing for other cases."""
    if "overlap" not in sizes:
        return {}
    medians = {on: statistics.median(t) for on, t in zip(sizes["overlap"], measured["times_by_engine"])}
    return {"step_s_median_off": round(medians[False], 4), "step_s_median_on": round(medians[True], 4),
            "step_s_all_on": [round(t, 4) for t in measured["times_by_engine"][sizes["overlap"].index(True)]],
            "ratio_on_off": round(medians[True] / medians[False], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, one timed step per layout")
    names = [name for name, _, _ in LAYOUTS]
    parser.add_argument("--case", action="append", choices=names, help="run only this case (repeatable)")
    args = parser.parse_args()
    cases = [case for case in LAYOUTS if args.case is None or case[0] in args.case]
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
        for name, world_size, layout in cases:
            if name.endswith("_packed"):
                sizes = PACKED["quick" if args.quick else "full"]
            else:
                sizes = QUICK if args.quick else FULL
            if name.endswith("_overlap"):
                sizes = {**sizes, **OVERLAP, "steps": 1 if args.quick else OVERLAP["steps"]}
            threads = max(1, cores // world_size)
            load = os.getloadavg()[0]
            measured = run_case(world_size, threads, path, layout, sizes)
            times, tokens = measured["times"], measured["tokens"]
            step_s = statistics.median(times)
            achieved = 6 * flop_params * tokens / step_s
            print(json.dumps({
                "case": name, "ranks": world_size, "pp": layout.get("pp", 1), "tp": layout.get("tp", 1),
                "dp": world_size // (layout.get("pp", 1) * layout.get("tp", 1)), "threads_per_rank": threads,
                "oversubscribed": world_size * threads > cores, "params": num_params, "flop_params": flop_params,
                "global_batch_seqs": sizes["num_seqs"], "seq_len": sizes["seq_len"],
                "packed": sizes.get("packed", False),
                "micro_batches_per_dp_rank": sizes["num_micro_batches"], "tokens_per_step": tokens,
                "step_s_median": round(step_s, 4), "step_s_min": round(min(times), 4),
                "step_s_all": [round(t, 4) for t in times], "loadavg_1m_before": round(load, 2),
                "tokens_per_s": round(tokens / step_s, 1), "achieved_flops": achieved,
                "fraction_of_roof": round(achieved / roof, 4), "flops_formula": "6 * flop_params * tokens",
                "rss_before_steps_mb": round(measured["rss_before"] / 2**20, 1),
                "peak_rss_steps_mb": round(measured["peak_rss"] / 2**20, 1), **overlap_fields(sizes, measured)}),
                flush=True)
        print(json.dumps({"case": "env_end", "roof_flops": measure_roof(cores), "roof_flops_1thread": measure_roof(1),
                          "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
