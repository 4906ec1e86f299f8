"""Generated tokens/s of hfrl's rollout engine against transformers' ``generate``, same weights, one run.

    python benchmarks/rollout_throughput.py            # ~20M-parameter Llama, fp32, the cases below
    python benchmarks/rollout_throughput.py --quick    # smaller, for a smoke test

Cases (one JSON line each: case, tokens_per_s, baseline_tokens_per_s, speedup, plus details):

- ``ragged``: 64 prompts of 16..64 tokens, greedy, at most 256 new tokens. The stop tokens are
  chosen from a first, unstopped greedy run so that responses end at ragged lengths (8..256); both
  engines decode greedily with the same stop ids, so they produce the same tokens (checked:
  ``tokens_match``) and the same work is timed. transformers gets the batch left-padded, as a user
  would call it.
- ``grpo``: 16 prompts x n = 8 samples at temperature 1 (transformers: ``num_return_sequences=8``);
  the samples differ between engines, so each reports its own token count.

A ``decode_roof`` line sets hfrl's decode time against the memory roof: the time to read the
weights once per decode step plus every sequence's KV cache once, at the bandwidth this machine
measures for a large sum (the bound no decode step can beat on a memory-bound machine).
Same thread count for both (torch's default unless ``--threads``). The ragged case times each engine
``--repeats`` times, interleaved, and reports the medians (``speedup_each``: every pair's ratio);
this machine's speed drifts by tens of percent between minutes. ``row_step_ratio`` is the
gain continuous batching alone can bring at an equal cost per decoded row (transformers decodes
every row until the longest one ends); a larger speedup needs a cheaper row or step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from hfrl.models import weights
from hfrl.rollout import RolloutEngine, SamplingParams


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(prefix="hfrl-rollout-bench-") as folder:  # removed once loaded
        ref.save_pretrained(folder)
        model = weights.from_pretrained(folder).eval()
    return ref, model


def hf_generate(ref, prompts, max_new, stop_ids, **kwargs):
    """Left-padded batch generate; returns the response token lists (up to and including a stop)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=list(stop_ids) or None,
                       pad_token_id=0, **kwargs)[:, width:]
    responses = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        responses.append(row[:cut])
    return responses


def pick_stops(responses, rng, low=8):
    """Stop ids that end greedy responses at spread-out lengths: for each response in random order,
    its token at a random target position, unless that token would end some response too early."""
    stops: set[int] = set()

    def length(r):
        return next((i + 1 for i, t in enumerate(r) if t in stops), len(r))

    for r in rng.sample(responses, len(responses)):
        target = rng.randint(low, len(r))
        token = r[target - 1]
        trial = stops | {token}
        if all(next((i + 1 for i, t in enumerate(x) if t in trial), len(x)) >= low for x in responses):
            stops = trial
    return sorted(stops), [length(r) for r in responses]


def bandwidth_gbs() -> float:
    x = torch.ones(64 << 20)  # 256 MB
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and batch (smoke test)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default="ragged,grpo")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved timed runs of each engine in the ragged case; medians are reported")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.vocab, args.hidden, args.layers = (32000, 256, 8) if not args.quick else (2000, 128, 2)
    num_prompts, max_new = (64, 256) if not args.quick else (8, 32)
    ref, model = build(args)
    params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(rng.randint(16, 64))] for _ in range(num_prompts)]
    engine = RolloutEngine(model, block_size=16, kv_cache_bytes=2 << 30, max_num_seqs=256)
    header = dict(params=params, threads=torch.get_num_threads(), dtype="float32")
    print(json.dumps({"case": "setup", **header}), flush=True)

    if "ragged" in args.cases:
        free_run = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
        stops, lengths = pick_stops([s.token_ids for s in free_run.samples], rng, low=min(8, max_new))
        greedy = SamplingParams(temperature=0, max_new_tokens=max_new, stop_token_ids=stops)
        engine.generate(prompts[:4], greedy)  # warm-up
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
            out, t = timed(lambda: engine.generate(prompts, greedy))
            ours_s.append(t)
            with torch.no_grad():
                base, t = timed(lambda: hf_generate(ref, prompts, max_new, set(stops), do_sample=False))
            theirs_s.append(t)
        t_hfrl, t_hf = statistics.median(ours_s), statistics.median(theirs_s)
        ours = [s.token_ids for s in out.samples]
        tokens = sum(map(len, ours))
        print(json.dumps(dict(
            case="ragged", tokens_per_s=tokens / t_hfrl, baseline_tokens_per_s=sum(map(len, base)) / t_hf,
            speedup=t_hf / t_hfrl * sum(map(len, base)) / tokens, tokens_match=ours == base,
            generated_tokens=tokens, response_len_min=min(map(len, ours)), response_len_mean=tokens / len(ours),
            response_len_max=max(map(len, ours)),
            # transformers decodes every row until the longest finishes; hfrl only live rows. Their
            # ratio bounds what removing finished rows alone can gain at equal cost per row.
            row_step_ratio=len(ours) * max(map(len, ours)) / tokens, hfrl_s=t_hfrl, transformers_s=t_hf,
            repeats=args.repeats, speedup_each=[round(b / a, 3) for a, b in zip(ours_s, theirs_s)],
            prefill_s=out.stats["time_prefill_s"], decode_s=out.stats["time_decode_s"],
            decode_steps=out.stats["decode_steps"], kv_peak_bytes=out.stats["kv_peak_bytes"])), flush=True)
        # Memory roof of the decode steps: weights (minus the embedding table, read by row) once per
        # step, and each sequence's cached keys/values once per token it decodes.
        bw = bandwidth_gbs()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if "embed_tokens" not in n)
        kv_per_token = engine.shape.bytes_per_block // engine.shape.block_size
        kv_bytes = sum(kv_per_token * sum(range(len(p) + 1, len(p) + len(r)))
                       for p, r in zip(prompts, ours))
        steps = out.stats["decode_steps"]
        roof = (weight_bytes * steps + kv_bytes) / (bw * 1e9)
        print(json.dumps(dict(case="decode_roof", decode_s=out.stats["time_decode_s"], roof_s=roof,
                              fraction_of_roof=roof / out.stats["time_decode_s"], bandwidth_gbs=bw,
                              decode_step_ms=1e3 * out.stats["time_decode_s"] / steps,
                              roof_step_ms=1e3 * roof / steps, weight_mb=weight_bytes / 1e6,
                              kv_gb_read=kv_bytes / 1e9)), flush=True)

    if "grpo" in args.cases:
        n, group = (8, 16) if not args.quick else (4, 4)
        sampled = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=0,
                                 stop_token_ids=stops if "ragged" in args.cases else [])
        out, t_hfrl = timed(lambda: engine.generate(prompts[:group], sampled))
        tokens = sum(len(s.token_ids) for s in out.samples)
        with torch.no_grad():
            base, t_hf = timed(lambda: hf_generate(ref, prompts[:group], max_new, set(sampled.stop_token_ids),
                                                   do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                   num_return_sequences=n))
        base_tokens = sum(map(len, base))
        print(json.dumps(dict(case="grpo", tokens_per_s=tokens / t_hfrl, baseline_tokens_per_s=base_tokens / t_hf,
                              speedup=(tokens / t_hfrl) / (base_tokens / t_hf), generated_tokens=tokens,
                              baseline_generated_tokens=base_tokens, hfrl_s=t_hfrl, transformers_s=t_hf,
                              prefill_tokens=out.stats["prefill_tokens"],
                              kv_peak_bytes=out.stats["kv_peak_bytes"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
