"""Figure 15 (generation parallel size): the actor's generation latency against the generation
tensor-parallel size tg, for one fixed training layout.

    python benchmarks/paper/fig15_gen_tp.py            # results/fig15_gen_tp.{jsonl,png}
    python benchmarks/paper/fig15_gen_tp.py --quick    # 1 timed generation per tg

Measured (CPU scale, 4 ranks under torchrun, gloo, one thread each): a ~26M-parameter Llama (hidden
512, 8 layers, vocabulary 2000, random weights) trained with pp1 tp4 dp1; for tg = 1, 2 and 4 the
same TrainEngine generates through a HybridEngine of that generation layout (hybridflow mode): 32
prompts of 16 tokens split over the dp * dg = 4 / tg generation replicas, 32 greedy new tokens each
(no stop token, so every tg does the same work). A line per tg: the slowest rank's time for the
transition (enter + exit) and for the generation itself, medians over the timed repeats.

Simulated (paper scale, A100-80GB, the paper's workload): the PPO mapping hfrl's search picks for a
7B actor on 16 GPUs and a 13B actor on 32 (training tp = 8), with the actor's generation layout
replaced by pg = 1 and each tg in 1, 2, 4, 8: the predicted generation stage and transition.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Results, out_dir, parser, pyplot  # noqa: E402

RANKS, TP, TGS = 4, 4, (1, 2, 4)
MODEL = dict(vocab_size=2000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=128, tie_word_embeddings=False)
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 16, 32
SIM_CASES = [("7b", 16), ("13b", 32)]
SIM_TGS = (1, 2, 4, 8)


def child(path: str, repeats: int) -> None:
    """Under torchrun: for each tg, generate with a HybridEngine of that layout; rank 0 prints lines."""
    import torch
    import torch.distributed as dist

    from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
    from hfrl.engine.train_engine import EngineConfig, TrainEngine
    from hfrl.hybrid_engine.engine import HybridEngine
    from hfrl.rollout import SamplingParams

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cache, pool = GroupCache(), tuple(range(world))
    engine = TrainEngine(EngineConfig(model_path=path),
                         build_groups("actor", ParallelDims.create(world, tp=TP, tg=TP), pool, rank, cache))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, MODEL["vocab_size"], (NUM_PROMPTS, PROMPT_LEN), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    for tg in TGS:
        groups = build_groups("actor", ParallelDims.create(world, tp=TP, tg=tg), pool, rank, cache)
        hybrid = HybridEngine(engine, groups=groups)
        rollout = hybrid.rollout_engine(kv_cache_bytes=64 << 20, max_num_seqs=NUM_PROMPTS)
        replicas = groups.dims.num_gen_replicas
        mine = prompts[groups.coord.gen_replica(groups.dims.dg)::replicas]
        totals, transitions, tokens = [], [], 0
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            with hybrid.generation():
                out = rollout.generate(mine, params)
            elapsed = time.perf_counter() - start
            times = torch.tensor([elapsed, hybrid.last.enter_s + hybrid.last.exit_s], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            if i:   # the first is warm-up
                totals.append(float(times[0]))
                transitions.append(float(times[1]))
            tokens = sum(len(s.token_ids) for s in out.samples)
        count = torch.tensor([tokens if groups.coord.gen_tp == 0 else 0])
        dist.all_reduce(count)
        if rank == 0:
            total, transition = statistics.median(totals), statistics.median(transitions)
            print("RESULT " + json.dumps({"tg": tg, "replicas": replicas, "total_s": total, "transition_s": transition,
                                          "gen_s": total - transition, "generated_tokens": int(count),
                                          "repeats": repeats}), flush=True)
        del hybrid, rollout
    dist.destroy_process_group()


def measured(results: Results, repeats: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), __file__, "--child",
               "--repeats", str(repeats), folder]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or len(lines) != len(TGS):
        results.emit(kind="error", error=proc.stderr[-2000:])
        return
    for line in lines:
        results.emit(kind="measured", params=params, ranks=RANKS, train=f"pp1 tp{TP} dp1", **line)


def simulated(results: Results, cases) -> None:
    from hfrl.mapping import GenLayout, Mapping, RolePlan, Workload, get_profile, search, simulate

    from common import PAPER_DEVICE

    device = get_profile(PAPER_DEVICE)
    for size, n in cases:
        workload = Workload.paper("ppo", size)
        best = search(workload, n, device, top_k=1)[0].mapping
        actor = best.plan("actor")
        for tg in SIM_TGS:
            if actor.train.tp % tg:
                continue
            plans = tuple(RolePlan(p.role, p.num_devices, p.train, GenLayout(1, tg)) if p.role == "actor" else p
                          for p in best.plans)
            line = dict(kind="simulated", model=size, devices=n, mapping=best.describe(),
                        train=f"p{actor.train.pp}t{actor.train.tp}d{actor.train.dp}", tg=tg)
            try:
                est = simulate(workload, Mapping(best.placement, best.allocation, plans), device)
            except ValueError as err:   # the actor cannot generate in this layout beside the other models
                results.emit(**line, gen_s=None, transition_s=None, total_s=None, note=str(err)[:300])
                continue
            results.emit(**line, gen_s=est.stages["gen"], transition_s=est.transition_s,
                         total_s=est.stages["gen"] + est.transition_s, iteration_s=est.total_s)


def draw(results: Results) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results.of("measured")
    tgs = [r["tg"] for r in rows]
    left.bar([str(t) for t in tgs], [r["gen_s"] for r in rows], label="generation")
    left.bar([str(t) for t in tgs], [r["transition_s"] for r in rows], bottom=[r["gen_s"] for r in rows],
             label="transition")
    left.set_xlabel("generation tp (tg)")
    left.set_ylabel("seconds (measured)")
    left.set_title(f"measured: {RANKS} ranks, training pp1 tp{TP}")
    left.legend(fontsize=8)
    for size in dict.fromkeys(r["model"] for r in results.of("simulated")):
        sims = [r for r in results.of("simulated") if r["model"] == size and r["total_s"] is not None]
        right.plot([r["tg"] for r in sims], [r["total_s"] for r in sims], marker="o", label=f"{size} gen + transition")
    right.set_xscale("log", base=2)
    right.set_xlabel("generation tp (tg)")
    right.set_ylabel("seconds (predicted)")
    right.set_title("simulated: A100-80GB, training tp 8")
    right.legend(fontsize=8)
    results.save_figure(fig)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.path, args.repeats)
    results = Results("fig15_gen_tp", out_dir(args))
    measured(results, 1 if args.quick else args.repeats)
    simulated(results, SIM_CASES[:1] if args.quick else SIM_CASES)
    if not args.no_png:
        draw(results)
    results.close()


if __name__ == "__main__":
    main()
