"""Train -> generate -> train transition of the actor's weights, for the three resharding modes.

    python benchmarks/transition_time.py [--world-sizes 4 8] [--quick]

Builds a ~50M-parameter Llama checkpoint (random weights) in a temp folder, then for each world size
runs itself under ``torchrun`` on that many local ranks (gloo). For each layout every mode reshards
the same TrainEngine's weights: one warm-up transition, then ``iters`` timed ones. A transition is
``HybridEngine.enter()`` + ``exit()``; its time is the slowest rank's (the group moves on together),
the median over iterations. One JSON line per case on stdout:

    {"case": ..., "world_size": 4, "mode": "hybridflow", "layout": "pp1 tp4 dp1 -> pg1 tg2",
     "seconds": ..., "bytes_per_rank": ..., "predicted_bytes_per_rank": ..., "ratio_to_ds_chat": ...,
     "resident_gen_bytes": ..., "peak_bytes": ...}

``bytes_per_rank``: weight bytes the rank received entering generation (the resharder's counters, the
largest over ranks); ``predicted_bytes_per_rank``: Table 2's formula (``hfrl.hybrid_engine.accounting``)
with M = one training replica's parameter bytes. ``ratio_to_ds_chat``: seconds over ds_chat's at the
same layout, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(vocab_size=24000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
# (pp, tp, pg, tg) per world size: generation TP halved, and pipeline stages gathered into one
LAYOUTS = {4: [(1, 4, 1, 2), (1, 4, 1, 1), (2, 2, 1, 1)], 8: [(1, 4, 1, 2), (2, 4, 1, 2), (1, 8, 1, 2)]}
MODES = ("ds_chat", "hybridflow_v", "hybridflow")



def round_trip_seconds(hybrid, iters: int) -> float:
    """Median over ``iters`` (after one warm-up) of train -> generate -> train, slowest rank's time."""
    import torch
    import torch.distributed as dist

    times = []
    for i in range(iters + 1):
        dist.barrier()
        start = time.perf_counter()
        hybrid.enter()
        hybrid.exit()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:
            times.append(float(elapsed))
    return statistics.median(times)

def child(args) -> None:
    import torch
    import torch.distributed as dist

    from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
    from hfrl.engine.train_engine import EngineConfig, TrainEngine
    from hfrl.hybrid_engine import plan
    from hfrl.hybrid_engine.accounting import predict
    from hfrl.hybrid_engine.engine import HybridEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cache = GroupCache()
    for pp, tp, pg, tg in LAYOUTS[world]:
        engines = {}
        seconds = {}
        for mode in MODES:
            grouping = "vanilla" if mode == "hybridflow_v" else "hybridflow"
            if grouping not in engines:
                dims = ParallelDims.create(world, pp=pp, tp=tp, pg=pg, tg=tg, grouping=grouping)
                groups = build_groups("actor", dims, tuple(range(world)), rank, cache)
                engines[grouping] = TrainEngine(EngineConfig(model_path=args.path), groups)
            engine = engines[grouping]
            hybrid = HybridEngine(engine, mode=mode)
            round_trip = round_trip_seconds(hybrid, args.iters)
            counters = torch.tensor([hybrid.last.received, hybrid.last.peak, hybrid.resident_gen], dtype=torch.float64)
            dist.all_reduce(counters, op=dist.ReduceOp.MAX)
            seconds[mode] = round_trip
            specs = plan.generation_specs(engine.model_config, ParallelDims(pp=pp, tp=tp, dp=engine.dims.dp), 0)
            m_bytes = sum(plan.model_bytes_of(specs, tp, 4))
            if rank == 0:
                print(json.dumps({
                    "case": f"w{world}_pp{pp}_tp{tp}_tg{tg}_{mode}", "world_size": world, "mode": mode,
                    "layout": f"pp{pp} tp{tp} dp{engine.dims.dp} -> pg{pg} tg{tg}",
                    "seconds": round(seconds[mode], 4), "bytes_per_rank": int(counters[0]),
                    "predicted_bytes_per_rank": int(predict(engine.dims, mode).received * m_bytes),
                    "ratio_to_ds_chat": round(seconds[mode] / seconds["ds_chat"], 3),
                    "resident_gen_bytes": int(counters[2]), "peak_bytes": int(counters[1]),
                    "model_bytes": m_bytes, "iters": args.iters}), flush=True)
            del hybrid
        del engines
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--quick", action="store_true", help="2 timed transitions per case instead of 5")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--iters", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        print(json.dumps({"env": True, "params": params, "torch": torch.__version__, "cpus": os.cpu_count()}),
              flush=True)
        for world in args.world_sizes:
            if world not in LAYOUTS:
                raise SystemExit(f"--world-sizes: no layouts for {world} ranks; pick from {sorted(LAYOUTS)}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), __file__,
                   "--child", "--path", folder, "--iters", "2" if args.quick else "5"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env)


if __name__ == "__main__":
    main()
