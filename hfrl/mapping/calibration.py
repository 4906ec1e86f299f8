"""`calibrate()`: measure "this machine" into a `DeviceProfile` with hfrl's own code.

The roofs come from plain torch (GEMM, copy) and gloo (all-reduce, all-gather between two local
processes); the fixed costs from hfrl itself, on two processes at once (data parallel, as `hfrl
train`'s ranks run), timed on two probe models that differ only in depth (1 and 6 decoder layers,
tiny widths, so that their FLOPs and bytes cost next to nothing and what is left is per-pass and
per-layer overhead):

    forward micro-batch  f(L) = pass + L * layer              TrainEngine.compute_log_probs over 2 micro-batches, / 2
    train micro-batch    b(L) = train_pass + L * train_layer  (train_step(3 micro-batches) - train_step(1)) / 2
    optimizer step       o(L) = opt + L * opt_layer           train_step(1 micro-batch) - b(L)
    data-parallel sync   per optimizer step when dp > 1       train_step(1 micro-batch) on 2 ranks - alone
    decode step          s(L) = step + L * decode_layer       RolloutEngine.generate: (g(20) - g(4)) / 16
    stage call           rank 0 -> both ranks -> rank 0       a DP_COMPUTE no-op of hfrl's controller

Train steps use the actor's PPO loss on packed micro-batches, generation samples at temperature 1.
The train and optimizer lines are timed on one process alone (the other idle), the rest on both
processes at once, as data-parallel ranks run them.
Two depths give two equations per line; the probes' own compute (the cost model's FLOP and byte
terms at the measured roofs) is subtracted first. Each time is the median of 15 repetitions that
interleave every measurement, so a slow spell of the machine hits them alike.

Ranks of `hfrl train` on a CPU run one thread each (torchrun's default OMP_NUM_THREADS=1), so the
measurement runs at `threads` (default: OMP_NUM_THREADS, else 1) and the profile counts one device
per core; for runs with more ranks than cores, `simulate(..., cores=)` time-shares the cores among
the busy ranks (`DeviceProfile.oversubscribed` divides them evenly all the time).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import hfrl
from hfrl.controller import DP_COMPUTE, Batch, ResourcePool, Worker, WorkerGroup, register
from hfrl.mapping.devices import DeviceProfile
from hfrl.mapping.models import ModelSpec

_COLLECTIVE_BYTES = 64 * 2**20
PROBE_SHAPE = dict(vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                   max_position_embeddings=256)
"""The probe models' width: FLOPs and bytes negligible next to the fixed costs being measured."""
PROBE_DEPTHS = (1, 6)
PROBE_BATCH = (4, 24)
"""Sequences and tokens of the forward and train probes' micro-batch."""
DECODE_STEPS = (4, 20)
"""New tokens of the two generate calls whose difference gives the decode step."""
TRAIN_MICRO_BATCHES = (1, 3)
"""Micro-batches of the two train steps whose difference gives a micro-batch's fixed cost."""
PROBE_REPS = 15


def calibrate(seconds: float = 2.0, devices_per_node: int | None = None, threads: int | None = None,
              overheads: bool = True, reps: int = PROBE_REPS) -> DeviceProfile:
    """Measure this machine into a profile named "this-machine" (`seconds` + ~20-40 s).

    - peak_flops: best fp32 `torch.mm` rate (1024^3) at `threads` threads;
    - mem_bandwidth: best large-tensor copy rate (bytes read + written per second);
    - intra_node_bandwidth: gloo all-reduce (64 MiB) and all-gather (64 MiB out) between 2 local
      processes, as the per-device ring bandwidth the cost model divides by (all-reduce moves
      2(n-1)/n of the bytes per rank, all-gather (n-1)/n of the output); the mean of the two;
    - collective_latency_s: a 4-byte all-reduce; call_overhead_s: half a producer/consumer pair of
      DP_COMPUTE calls of hfrl's controller on the same 2 processes, carrying a stage's columns;
    - the pass, layer, decode and optimizer overheads: the probes of the module docstring
      (`overheads=False` leaves them 0; `reps` repetitions each, fewer for a quicker, noisier profile);
    - inter_node_bandwidth = intra (one node); devices_per_node = os.cpu_count() // threads unless
      given; memory_bytes = physical memory / devices_per_node (ranks share it);
    - efficiencies 1.0: these are measured roofs, not datasheet peaks.
    """
    threads = int(threads or os.environ.get("OMP_NUM_THREADS") or 1)
    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps={reps!r}: must be a positive number of repetitions")
    dpn = devices_per_node or max((os.cpu_count() or 1) // threads, 1)
    budget = max(float(seconds), 0.2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = _measure_matmul(budget * 0.5)
        bandwidth = _measure_copy(budget * 0.5)
    finally:
        torch.set_num_threads(previous)
    with tempfile.TemporaryDirectory(prefix="hfrl-calibrate-") as tmp:
        probes = _write_probes(tmp) if overheads else {}
        specs = {d: ModelSpec.from_hf_config(path) for d, path in probes.items()}
        result = _measure_two_ranks(threads, probes, reps)
    link, latency, call = result["bandwidth"], result["latency"], result["call"]
    fixed = fit_overheads({int(d): m for d, m in result["probes"].items()}, specs, peak, bandwidth,
                          solo={int(d): m for d, m in result["solo"].items()}) if overheads else {}
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceProfile("this-machine", peak_flops=peak, mem_bandwidth=bandwidth,
                         memory_bytes=int(total_memory // dpn), intra_node_bandwidth=link,
                         inter_node_bandwidth=link, devices_per_node=int(dpn),
                         matmul_efficiency=1.0, bandwidth_efficiency=1.0,
                         collective_latency_s=latency, call_overhead_s=call if overheads else 0.0, **fixed)


# ---- roofs ----------------------------------------------------------------------------------
def _best_rate(fn, work: float, seconds: float, min_reps: int = 3) -> float:
    """Best of repeated `fn()` calls (work units per second) within about `seconds`."""
    fn()  # warm-up
    best, start, reps = 0.0, time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best = max(best, work / max(time.perf_counter() - t0, 1e-9))
        reps += 1
    return best


def _measure_matmul(seconds: float) -> float:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3, seconds)


def _measure_copy(seconds: float) -> float:
    src = torch.ones(32 * 2**20)  # 128 MiB fp32: far beyond any cache
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * src.element_size(), seconds)


# ---- fixed costs of hfrl's own passes ---------------------------------------------------------
def _median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)



def _probe_times(paths: dict[int, str], groups, reps: int = PROBE_REPS, train_only: bool = False
                 ) -> dict[int, dict[str, float]]:
    """Per probe depth, median seconds of: one forward pass (two micro-batches), a PPO train step
    of one and of three micro-batches, and one generate call per DECODE_STEPS entry (temperature 1),
    with the data-parallel `groups` (every rank of the world runs them at once; None: this process
    alone). `train_only`: the train steps only. The repetitions
    interleave every measurement of every depth, so a slow spell of the machine hits them alike."""
    from hfrl.algorithms import ppo_clip_loss
    from hfrl.engine.config import EngineConfig, OptimConfig
    from hfrl.engine.train_engine import TrainEngine
    from hfrl.rollout.engine import RolloutEngine
    from hfrl.rollout.sampling import SamplingParams

    seqs, tokens = PROBE_BATCH
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, PROBE_SHAPE["vocab_size"], (seqs, tokens), generator=gen),
             "attention_mask": torch.ones(seqs, tokens, dtype=torch.long),
             "old_log_probs": torch.zeros(seqs, tokens), "advantages": torch.randn(seqs, tokens, generator=gen)}
    prompts = [list(range(1, 9))] * seqs

    def loss_fn(engine):
        def fn(logits, mb):  # the actor's policy loss (hfrl.workers.actor)
            log_probs = engine.token_log_probs(logits, mb["input_ids"])
            mask = mb["loss_mask"][:, 1:].float()
            return ppo_clip_loss(log_probs, mb["old_log_probs"][:, 1:], mb["advantages"][:, 1:], mask,
                                 clip_ratio_low=0.2, clip_ratio_high=0.2)
        return fn

    calls = {}
    for depth, path in paths.items():
        for mbs in TRAIN_MICRO_BATCHES:
            engine = TrainEngine(EngineConfig(model_path=path, optim=OptimConfig(lr=1e-5), pack_sequences=True,
                                              num_micro_batches=mbs), groups)
            calls[depth, f"train_{mbs}"] = functools.partial(engine.train_step, batch, loss_fn(engine))
        if train_only:
            continue
        engine = TrainEngine(EngineConfig(model_path=path, pack_sequences=True, num_micro_batches=2), groups)
        calls[depth, "forward"] = functools.partial(engine.compute_log_probs, batch)
        rollout = RolloutEngine(engine.model, kv_cache_bytes=1 << 22)
        for steps in DECODE_STEPS:
            params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=steps, stop_token_ids=[])
            calls[depth, f"generate_{steps}"] = functools.partial(rollout.generate, prompts, params)
    times: dict = {key: [] for key in calls}
    for rep in range(reps + 2):  # two warm-up rounds
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            if rep >= 2:
                times[key].append(time.perf_counter() - t0)
    out: dict[int, dict[str, float]] = {depth: {} for depth in paths}
    for (depth, name), values in times.items():
        out[depth][name] = statistics.median(values)
    return out


def _write_probes(folder: str) -> dict[int, str]:
    """The probe checkpoints, one per depth, under `folder`."""
    from transformers.utils import logging as hf_logging

    from hfrl.models.init import write_random_llama

    hf_logging.disable_progress_bar()
    try:
        return {d: str(write_random_llama(os.path.join(folder, f"probe{d}"), num_layers=d, **PROBE_SHAPE))
                for d in PROBE_DEPTHS}
    finally:
        hf_logging.enable_progress_bar()


def fit_overheads(measured: dict[int, dict[str, float]], specs: dict, peak_flops: float,
                  bandwidth: float, solo: dict[int, dict[str, float]] | None = None) -> dict[str, float]:
    """The profile's pass, layer, train, optimizer and decode overheads from the probe times of the
    two depths (`measured[depth]` as `_probe_times` returns them on 2 data-parallel ranks, `specs[depth]`
    their ModelSpecs), after subtracting what the cost model already counts at the measured roofs
    (module docstring). With `solo` (the train probes of one process alone), the train and optimizer
    lines come from it and dp_sync_overhead_s is what data parallelism adds to a one-micro-batch
    step (the mean over the depths of the difference: its all-reduces and the ranks waiting for
    each other)."""
    seqs, tokens = PROBE_BATCH
    k1, k2 = DECODE_STEPS

    def flops_time(depth: int, passes: int) -> float:
        return specs[depth].flops_per_token(tokens) * seqs * tokens * passes / peak_flops

    def residual_of(m: dict[str, float], depth: int) -> dict[str, float]:
        one, more = TRAIN_MICRO_BATCHES
        train_pass = (m[f"train_{more}"] - m[f"train_{one}"]) / (more - one)  # more micro-batches, same FLOPs
        return {"train": train_pass, "optimizer": m[f"train_{one}"] - flops_time(depth, 3) - one * train_pass}

    def residual(depth: int) -> dict[str, float]:
        m, spec = measured[depth], specs[depth]
        decode_roof = max(spec.param_bytes(4) / bandwidth, seqs * 2 * spec.matmul_params / peak_flops)
        return {"forward": (m["forward"] - flops_time(depth, 1)) / 2,   # two micro-batches
                **residual_of(m, depth),
                "step": (m[f"generate_{k2}"] - m[f"generate_{k1}"]) / (k2 - k1) - decode_roof}

    lo, hi = PROBE_DEPTHS
    r_lo, r_hi = residual(lo), residual(hi)
    if solo is not None:
        one = TRAIN_MICRO_BATCHES[0]
        sync = statistics.fmean(measured[d][f"train_{one}"] - solo[d][f"train_{one}"] for d in PROBE_DEPTHS)
        for r, d in ((r_lo, lo), (r_hi, hi)):
            alone = residual_of(solo[d], d)
            r["train"], r["optimizer"] = alone["train"], alone["optimizer"]

    def line(key: str) -> tuple[float, float]:
        """(intercept, slope per layer) through the two depths, both clamped at 0."""
        slope = max((r_hi[key] - r_lo[key]) / (hi - lo), 0.0)
        return max(r_lo[key] - slope * lo, 0.0), slope

    names = {"forward": ("pass_overhead_s", "layer_overhead_s"),
             "train": ("train_pass_overhead_s", "train_layer_overhead_s"),
             "optimizer": ("optimizer_step_overhead_s", "optimizer_layer_overhead_s"),
             "step": ("decode_step_overhead_s", "decode_layer_overhead_s")}
    fitted = {name: value for key, pair in names.items() for name, value in zip(pair, line(key))}
    if solo is not None:
        fitted["dp_sync_overhead_s"] = max(sync, 0.0)
    return fitted


# ---- collectives and the controller (2 processes) --------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_two_ranks(threads: int, probes: dict[int, str], reps: int = PROBE_REPS) -> dict:
    """Rank 0's results of `_two_rank_worker` on 2 spawned local gloo ranks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "two_ranks.json")
        mp.spawn(_two_rank_worker, args=(2, _free_port(), out, threads, probes, reps), nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def _two_rank_worker(rank: int, world: int, port: int, out: str, threads: int, probes: dict[int, str],
                     reps: int = PROBE_REPS) -> None:
    """One of 2 ranks measuring, all at once as `hfrl train`'s ranks run: the gloo links (per-device
    ring bandwidth, latency of a 4-byte all-reduce), a controller call, and the probes (data
    parallel over both ranks). Rank 0 writes the result."""
    from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups

    torch.set_num_threads(threads)
    # the launcher's variables, as torchrun sets them (hfrl.run reads its rank from them)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tiny = torch.zeros(1)
        latency = min(_timed(lambda: dist.all_reduce(tiny)) for _ in range(20))
        full = torch.ones(_COLLECTIVE_BYTES // 4)
        t_ar = min(_timed(lambda: dist.all_reduce(full)) for _ in range(3))
        shard = torch.ones(full.numel() // world)
        parts = list(full.chunk(world))
        t_ag = min(_timed(lambda: dist.all_gather(parts, shard)) for _ in range(3))
        ring = (world - 1) / world
        bw_ar = 2 * ring * _COLLECTIVE_BYTES / max(t_ar - latency, 1e-9)
        bw_ag = ring * _COLLECTIVE_BYTES / max(t_ag - latency, 1e-9)
        groups = build_groups("probe", ParallelDims(dp=world), tuple(range(world)), rank, GroupCache())
        solo = _probe_times(probes, None, reps, train_only=True) if probes and rank == 0 else {}
        dist.barrier()   # the other rank waits: rank 0's solo steps run alone
        measured = _probe_times(probes, groups, reps) if probes else {}
        call = _controller_call_time()
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"bandwidth": (bw_ar + bw_ag) / 2, "latency": latency, "call": call,
                           "probes": measured, "solo": solo}, f)
    finally:
        dist.destroy_process_group()


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CALL_COLUMNS, CALL_ROWS, CALL_TOKENS = 6, 8, 32
"""The controller probe's batch per rank: a stage's typical columns (ids, masks, log-probs, values,
advantages, returns) of a small RL batch."""


class _ProbeWorker(Worker):
    @register(protocol=DP_COMPUTE)
    def make(self, rows: int) -> Batch:
        """This rank's rows of a stage output: CALL_COLUMNS per-token columns."""
        return Batch({f"c{i}": torch.zeros(rows, CALL_TOKENS) for i in range(CALL_COLUMNS)})

    @register(protocol=DP_COMPUTE)
    def consume(self, batch: Batch) -> dict:
        """A stage reading the previous one's output and returning a few metrics."""
        return {"rows": len(batch), "sum": float(batch["c0"].sum())}


def _controller_call_time() -> float | None:
    """Seconds of one dataflow stage's controller work on every rank of the running process group:
    the median over pairs of DP_COMPUTE calls, a producer and a consumer reading its Future (rows
    move rank to rank, metrics come back to rank 0), halved. Rank 0 returns it, the others serve
    (None)."""
    return hfrl.run(_controller_main)


def _controller_main() -> float:
    world = dist.get_world_size()
    group = WorkerGroup(_ProbeWorker, ResourcePool("calibrate", tuple(range(world))))

    def pair():
        made = group.make(CALL_ROWS, blocking=False)
        group.consume(made)

    return _median_time(pair, 30, warmup=5) / 2

