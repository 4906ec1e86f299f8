"""Figure 14 (transition time): the actor's train -> generate -> train switch in the three
resharding modes (hybridflow: the 3D-HybridEngine; hybridflow_v: vanilla grouping; ds_chat: the
ZeRO-style all-gather of the whole model), against model size, measured and simulated.

    python benchmarks/paper/fig14_transition.py            # results/fig14_transition.{jsonl,png}
    python benchmarks/paper/fig14_transition.py --quick    # the smallest model, 2 timed transitions

Measured (CPU scale, 4 ranks under torchrun, gloo): Llamas of ~15M, ~29M and ~50M parameters (random
weights; the widest is benchmarks/transition_time.py's model), trained with pp1 tp4 dp1 and
generating with pg1 tg2. Every mode reshards the same training weights: one warm-up transition,
then the timed ones; a transition is HybridEngine.enter() + exit(), its time the slowest rank's, the
median over iterations. Each line also has the bytes a rank received (the resharder's counters) and
Table 2's prediction of them.

Simulated (paper scale, A100-80GB): `hfrl.mapping.transition_time` per mode for 7B, 13B, 34B and
70B actors, each trained in the layout hfrl's search gives the PPO actor on 16, 32, 64 and 128 GPUs,
and generating with pg = 1 and tg the smallest power of two >= 2 at which the actor's bf16 weights
take at most a quarter of a GPU (the rest is for the KV cache).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, Results, out_dir, parser, pyplot  # noqa: E402
from transition_time import round_trip_seconds  # noqa: E402

RANKS, LAYOUT = 4, (1, 4, 1, 2)   # (pp, tp, pg, tg)
SIZES = {"15m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8),
         "29m": dict(hidden_size=384, intermediate_size=1056, num_hidden_layers=6, num_attention_heads=8),
         "50m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)}
SIM_CASES = [("7b", 16), ("13b", 32), ("34b", 64), ("70b", 128)]
MODES = ("ds_chat", "hybridflow_v", "hybridflow")


def child(paths: list[str], iters: int) -> None:
    """Under torchrun: every mode's transitions for each checkpoint; rank 0 prints one line each."""
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
    pp, tp, pg, tg = LAYOUT
    cache = GroupCache()
    for path in paths:
        engines = {}
        for mode in MODES:
            grouping = "vanilla" if mode == "hybridflow_v" else "hybridflow"
            if grouping not in engines:
                dims = ParallelDims.create(world, pp=pp, tp=tp, pg=pg, tg=tg, grouping=grouping)
                engines[grouping] = TrainEngine(EngineConfig(model_path=path), build_groups("actor", dims,
                                                tuple(range(world)), rank, cache))
            engine = engines[grouping]
            hybrid = HybridEngine(engine, mode=mode)
            seconds = round_trip_seconds(hybrid, iters)
            received = torch.tensor([hybrid.last.received], dtype=torch.float64)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            specs = plan.generation_specs(engine.model_config, ParallelDims(pp=pp, tp=tp, dp=engine.dims.dp), 0)
            m_bytes = sum(plan.model_bytes_of(specs, tp, 4))
            if rank == 0:
                print("RESULT " + json.dumps({
                    "mode": mode, "layout": f"pp{pp} tp{tp} dp{engine.dims.dp} -> pg{pg} tg{tg}",
                    "seconds": seconds, "bytes_per_rank": int(received),
                    "predicted_bytes_per_rank": int(predict(engine.dims, mode).received * m_bytes),
                    "model_bytes": m_bytes, "iters": iters}), flush=True)
            del hybrid
        del engines
    dist.destroy_process_group()


def measured(results: Results, names: list[str], iters: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        paths, params = [], {}
        for name in names:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(vocab_size=24000, num_key_value_heads=8, max_position_embeddings=512,
                                                 tie_word_embeddings=False, **SIZES[name]))
            params[name] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(f"{folder}/{name}")
            paths.append(f"{folder}/{name}")
            del model
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), __file__, "--child",
               "--iters", str(iters), *paths]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or len(lines) != len(names) * len(MODES):
            results.emit(kind="error", error=proc.stderr[-2000:])
            return
    for i, name in enumerate(names):
        group = lines[i * len(MODES):(i + 1) * len(MODES)]
        seconds = {l["mode"]: l["seconds"] for l in group}
        for line in group:
            results.emit(kind="measured", model=name, params=params[name], ranks=RANKS, **line,
                         reduction_vs={m: 1 - line["seconds"] / seconds[m] for m in MODES if m != line["mode"]})


def paper_layouts(size: str, n: int, device):
    """(train, gen) of the module docstring for a `size` actor on n GPUs."""
    from hfrl.mapping import GenLayout, ModelSpec, Workload, search

    best = search(Workload.paper("ppo", size), n, device, top_k=1)[0].mapping.plan("actor")
    weights = ModelSpec.from_name(size).param_bytes()
    tg = 2
    while tg < best.train.tp and weights / tg > device.memory_bytes / 4:
        tg *= 2
    return best.train, GenLayout(1, min(tg, best.train.tp))


def simulated(results: Results, cases) -> None:
    from hfrl.mapping import ModelSpec, get_profile, transition_bytes, transition_time

    from common import PAPER_DEVICE

    device = get_profile(PAPER_DEVICE)
    for size, n in cases:
        train, gen = paper_layouts(size, n, device)
        spec = ModelSpec.from_name(size)
        seconds = {m: transition_time(spec, train, gen, device, mode=m) for m in MODES}
        results.emit(kind="simulated", model=size, devices=n, train=f"p{train.pp}t{train.tp}d{train.dp}",
                     gen=f"pg{gen.pg}tg{gen.tg}", seconds=seconds,
                     bytes_per_rank={m: transition_bytes(spec, train, gen, m) for m in MODES},
                     reduction_vs={m: (1 - seconds["hybridflow"] / seconds[m] if seconds[m] else None)
                                   for m in MODES if m != "hybridflow"})


def draw(results: Results) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for side, kind in ((left, "measured"), (right, "simulated")):
        rows = results.of(kind)
        names = list(dict.fromkeys(r["model"] for r in rows))
        width = 0.25
        for i, mode in enumerate(MODES):
            values = [next((r["seconds"] if kind == "measured" else r["seconds"][mode]) for r in rows
                           if r["model"] == name and (kind == "simulated" or r["mode"] == mode)) for name in names]
            side.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=mode)
        side.set_xticks(range(len(names)), names)
        side.set_ylabel("train -> generate -> train (s)")
        side.legend(fontsize=8)
    left.set_title(f"measured: {RANKS} ranks, pp1 tp4 -> tg2 (gloo)")
    right.set_title("simulated: A100-80GB, layouts of the module docstring")
    results.save_figure(fig)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.paths, args.iters)
    results = Results("fig14_transition", out_dir(args))
    measured(results, ["15m"] if args.quick else list(SIZES), 2 if args.quick else args.iters)
    simulated(results, SIM_CASES[:1] if args.quick else SIM_CASES)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
