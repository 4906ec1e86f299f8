"""Decode attention on CPU: hfrl's compiled kernel and PyTorch path against padded gather + SDPA.

    python benchmarks/decode_attention.py [--threads N] [--chunks]

One JSON line per case: ``ms`` (hfrl_kernels.decode_attention on a token-major key cache, its own
chunk size), ``dim_ms`` (the same on a dim-major key cache: the rollout engine's CPU layout, the
two-embedding-bag path; ``dim_speedup`` = baseline_ms / dim_ms) and ``baseline_ms`` (gather every sequence's blocks into a (B, max_len) padded tensor, then
F.scaled_dot_product_attention with a length mask), medians; ``speedup`` = baseline_ms / ms.
``native_ms`` (fp32, where ``hfrl_kernels.native`` builds) is the compiled C kernel on the dim-major
cache, the rollout engine's CPU fp32 path (``native_speedup`` = baseline_ms / native_ms, and
``native_vs_dim`` = dim_ms / native_ms against the PyTorch path on the same cache).
``kv_bytes`` is the K and V the sequences own (sum of lengths x kv heads x head_dim x 2 x element
size), ``gb_per_s`` / ``baseline_gb_per_s`` that over the time. Each timed call reads another
layer's cache (layers rotate until they exceed the 32 MiB L3), as the engine's decode step does.
``chunk_sizes`` is the (full, tail) chunk lengths the PyTorch path picks (tail None: one length).
``--chunks`` adds ``chunk_ms``: the PyTorch path at each forced single chunk size (16 = one chunk
per block, the "flattened" scheme; 512 = nearly one padded chunk per sequence).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from hfrl_kernels import native
from hfrl_kernels.decode_attention import choose_chunk_sizes, decode_attention_reference, empty_key_cache

CASES = [  # name, batch, num_heads, num_kv_heads, head_dim, block_size, (min_len, max_len)
    ("ragged64_gqa2", 64, 8, 4, 64, 16, (20, 400)),
    ("ragged64_mha", 64, 8, 8, 64, 16, (20, 400)),
    ("ragged64_gqa4", 64, 8, 2, 64, 16, (20, 400)),
    ("ragged64_gqa8", 64, 16, 2, 64, 16, (20, 400)),
    ("ragged64_gqa8_hd128", 64, 16, 2, 128, 16, (20, 400)),
    ("uniform64_gqa2", 64, 8, 4, 64, 16, (300, 300)),
    ("long8_gqa2", 8, 8, 4, 64, 16, (1800, 2200)),
    ("straggler64_gqa2", 64, 4, 2, 64, 16, (20, 60)),  # plus one sequence of STRAGGLER_LEN keys
]
L3_BYTES = 32 * 2**20
STRAGGLER_LEN = 4000


def make_layers(batch, num_heads, num_kv_heads, head_dim, block_size, lens, dtype):
    gen = torch.Generator().manual_seed(0)
    blocks = (lens + block_size - 1) // block_size
    num_blocks = int(blocks.sum()) + 16
    tables = torch.full((batch, int(blocks.max())), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    offsets = torch.cumsum(blocks, 0) - blocks
    for b in range(batch):
        tables[b, :blocks[b]] = perm[offsets[b]:offsets[b] + blocks[b]]
    layer_bytes = 2 * num_blocks * block_size * num_kv_heads * head_dim * dtype.itemsize
    num_layers = max(2, min(8, math.ceil(4 * L3_BYTES / layer_bytes)))
    caches = [(torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype),
               torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype))
              for _ in range(num_layers)]
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    return q, caches, tables


def padded_sdpa(q, k_cache, v_cache, tables, lens):
    """The baseline: pad every sequence to the longest, mask, SDPA."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = (int(lens.max()) + block_size - 1) // block_size
    index = tables[:, :max_blocks].long().clamp_min(0)
    keys = k_cache[index].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[index].view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    mask = torch.arange(keys.shape[2]) < lens[:, None]
    out = F.scaled_dot_product_attention(q.view(batch, num_kv_heads, -1, head_dim), keys, values,
                                         attn_mask=mask[:, None, None, :])
    return out.reshape(batch, num_heads, head_dim)


def median_ms(fn, caches, reps: int) -> float:
    for k, v in caches[:2]:
        fn(k, v)
    times = []
    for i in range(reps):
        k, v = caches[i % len(caches)]
        start = time.perf_counter()
        fn(k, v)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--chunks", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(json.dumps({"case": "env", "torch": torch.__version__, "threads": args.threads,
                      "dtype": args.dtype, "native": native.available() or native.reason()}))
    for name, batch, num_heads, num_kv_heads, head_dim, block_size, (lo, hi) in CASES:
        lens = torch.randint(lo, hi + 1, (batch,), generator=torch.Generator().manual_seed(1),
                             dtype=torch.int32)
        if name.startswith("straggler"):  # an RL rollout's tail: one long response among short ones
            lens[batch // 2] = STRAGGLER_LEN
        q, caches, tables = make_layers(batch, num_heads, num_kv_heads, head_dim, block_size, lens, dtype)
        ours = lambda k, v, c=None: decode_attention_reference(q, k, v, tables, lens, chunk_size=c)
        ref = padded_sdpa(q, *caches[0], tables, lens)
        err = (ours(*caches[0]).float() - ref.float()).abs().max().item()
        kv_bytes = 2 * int(lens.sum()) * num_kv_heads * head_dim * dtype.itemsize
        ms = median_ms(ours, caches, args.reps)
        dim_caches = [(empty_key_cache((), *k.shape, "dim", dtype=dtype).copy_(k), v) for k, v in caches]
        dim_err = (ours(*dim_caches[0]).float() - ref.float()).abs().max().item()
        dim_ms = median_ms(ours, dim_caches, args.reps)
        baseline_ms = median_ms(lambda k, v: padded_sdpa(q, k, v, tables, lens), caches, args.reps)
        row = {"case": name, "ms": round(ms, 2), "baseline_ms": round(baseline_ms, 2),
               "speedup": round(baseline_ms / ms, 2), "kv_bytes": kv_bytes,
               "gb_per_s": round(kv_bytes / ms / 1e6, 2),
               "baseline_gb_per_s": round(kv_bytes / baseline_ms / 1e6, 2),
               "dim_ms": round(dim_ms, 2), "dim_speedup": round(baseline_ms / dim_ms, 2),
               "chunk_sizes": choose_chunk_sizes(lens.long()), "max_abs_diff": max(err, dim_err)}
        if native.supports(q, *dim_caches[0]):
            scale = head_dim ** -0.5
            compiled = lambda k, v: native.decode_attention(q, k, v, tables, lens, scale)
            row["max_abs_diff"] = max(row["max_abs_diff"], (compiled(*dim_caches[0]) - ref).abs().max().item())
            native_ms = median_ms(compiled, dim_caches, args.reps)
            row.update(native_ms=round(native_ms, 2), native_speedup=round(baseline_ms / native_ms, 2),
                       native_vs_dim=round(dim_ms / native_ms, 2),
                       native_gb_per_s=round(kv_bytes / native_ms / 1e6, 2))
        if args.chunks:
            row["chunk_ms"] = {c: round(median_ms(lambda k, v: ours(k, v, c), caches, args.reps), 2)
                               for c in (16, 32, 64, 128, 256, 512)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
