"""Decode attention over a paged KV cache: one query token per sequence, GQA, ragged lengths.

    out = decode_attention(q, k_cache, v_cache, block_tables, seq_lens)    # (B, num_heads, head_dim)

Sequence b's keys are the first ``seq_lens[b]`` tokens of the blocks listed in ``block_tables[b]``
(the current token's K/V already written); query head h reads kv head h // (num_heads //
num_kv_heads). With ``sliding_window=w`` only the last w keys count (positions >= seq_len - w, as in
Mistral). Softmax and accumulation are fp32; the result has q's dtype.

Key cache layouts. ``k_cache`` always has the logical shape (num_blocks, block_size, num_kv_heads,
head_dim); its storage is either token-major (that shape, contiguous: what the Triton kernel and
vLLM use) or dim-major (a view of (num_blocks, num_kv_heads, head_dim, block_size) storage, made by
``empty_key_cache(..., "dim")``: each block's keys dimension by dimension). ``key_layout_for``
names the faster one for a device and dtype; the value cache is token-major in both.

Three implementations: Triton where ``hfrl_kernels.use_triton(q)``; else the compiled CPU kernel
(``hfrl_kernels.native``, C built on first use) for fp32 with a dim-major key cache where it is
available (``native.supports``); else the PyTorch path:

- ``_decode_attention_triton``: split-K "flash-decoding". Program (b, kv_head, split) reads its
  split's keys once for the whole group of query heads sharing that kv head and writes a partial
  (max, sum of exponentials, weighted values); a second kernel merges the splits. With one split the
  first kernel writes the output itself. It addresses the caches by their strides (any layout).
- ``native.decode_attention``: one call per layer, one work item per (sequence, kv head) over
  OpenMP threads, reading each kv head's keys once for its whole group of query heads (the rollout
  engine's CPU fp32 path; its decode step also fuses RoPE and the cache write into that call).
- ``decode_attention_reference`` (PyTorch): the CPU path where no C compiler is available (and for
  fp64), made from a plan computed once per decode step (``plan_decode``, on the host), with no
  per-sequence loop:
  - dim-major keys, CPU fp32/fp64 (``_dim_major_attention``, the rollout engine's CPU path): the
    scores of one block for one query head are ``F.embedding_bag`` over the block's head_dim rows
    of keys with the query as per-sample weights, and the weighted sum of values is a second bag
    over the value cache with the probabilities as weights: nothing is gathered or copied.
  - token-major keys, CPU fp32/fp64 (``_bag_attention``): every sequence's key range is cut into
    chunks, full chunks of C keys and small tail chunks of c keys (a 150-key sequence is 128 + 32,
    not a padded 256); the chunks' keys are gathered and scored with one batched matmul, the softmax
    runs over each sequence's chunks together, and the values are an embedding bag as above.
  - elsewhere (bf16, a GPU without Triton: ``_flash_chunks``) the chunks' keys and values are
    gathered and ATen's fused attention runs per chunk, merging a sequence's chunks by their
    log-sum-exps (flash-decoding with C-token splits).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from hfrl_kernels import interpreting, keys_dim_major, native, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

_INDEX_DTYPES = (torch.int32, torch.int64)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                     sliding_window: int | None = None, num_splits: int | None = None,
                     plan: "DecodePlan | None" = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q: (B, num_heads, head_dim). k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim),
    one layer. block_tables: (B, max_blocks_per_seq) int32/int64, physical block ids in order
    (entries past a sequence's last block are never read). seq_lens: (B,) int32/int64, >= 1.
    scale defaults to head_dim ** -0.5. num_splits: key splits per sequence on the Triton path
    (None: ``choose_num_splits``); the PyTorch path picks its own chunking.
    plan: ``plan_decode(block_tables, seq_lens, block_size, sliding_window)``, computed once per
    decode step and passed to every layer, so the PyTorch path indexes the batch once rather than
    once per layer (the Triton path ignores it).
    Returns (B, num_heads, head_dim) in q's dtype.
    """
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, num_splits)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        return _decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                        sliding_window, num_splits)
    if native.supports(q, k_cache, v_cache):
        return native.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    if plan is None:
        plan = plan_decode(block_tables, seq_lens, k_cache.shape[1], sliding_window)
    elif plan.sliding_window != sliding_window or plan.block_size != k_cache.shape[1]:
        raise ValueError(f"plan was made for sliding_window={plan.sliding_window}, block_size="
                         f"{plan.block_size}; this call has {sliding_window}, {k_cache.shape[1]}")
    return _reference(q, k_cache, v_cache, plan, scale)


def _validate(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, num_splits) -> None:
    """Shape, dtype and device checks that need no device-to-host copy."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, num_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be (num_blocks, block_size, num_kv_heads, head_dim), got shape "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                         f"{tuple(k_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the KV cache has head_dim {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not q.dtype.is_floating_point or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one floating dtype, got {q.dtype}, "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be (batch={batch}, max_blocks_per_seq), got shape "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be (batch={batch},), got shape {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, value in (("sliding_window", sliding_window), ("num_splits", num_splits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


def _validate_lengths(seq_lens: torch.Tensor, capacity: int) -> None:
    """Value checks, for the host-side path only (they would synchronise a GPU)."""
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 1 or hi > capacity:
        raise ValueError(f"seq_lens must lie in [1, max_blocks_per_seq * block_size = {capacity}], "
                         f"got values in [{lo}, {hi}]")


# ---- PyTorch path (production on CPU) -------------------------------------------------------------

CHUNK_SIZES = (32, 64, 128, 256, 512)
TAIL_CHUNK_SIZES = (16, 32)
CHUNK_OVERHEAD_TOKENS = 48
"""Cost of one chunk in the fused attention beyond its keys, in keys (calibrated with
benchmarks/decode_attention.py: small chunks pay per-chunk overhead, large ones pad more)."""
GROUP_OVERHEAD_TOKENS = 384
"""Cost of a second group of chunks (one more call per layer), in keys."""
MERGE_OVERHEAD_TOKENS = 3072
"""Cost of merging chunks into sequences (a sequence with several chunks, or two groups): some twenty
small ops per layer, in keys of the whole batch. Padding costs less than its keys suggest (a padded
slot re-reads its sequence's first key, already in cache), so one padded chunk per sequence often
beats splitting: measured on benchmarks/decode_attention.py shapes and the rollout benchmark's."""


def choose_chunk_sizes(spans) -> tuple[int, int | None]:
    """The chunk lengths (C, c) minimising padded keys + per-chunk overhead over this batch's key spans.

    Every sequence's keys fill chunks of C; what is left over (its tail) goes either into one more,
    padded, chunk of C or into chunks of c, whichever costs that sequence less. c None: one chunk
    length for all. Two lengths pad less (a 150-key span costs 128 + 32 rather than 256 keys) for
    the price of a second call per layer; several chunks per sequence cost a merge. The last
    candidate is one chunk per sequence, as long as the longest span (rounded up to 16 keys): most
    padding, but no merge. ``spans``: (B,) key counts, a host tensor or array.

    Measured with benchmarks/decode_attention.py --chunks (fp32, 2 threads, caches rotating past L3;
    ms per call for C = 16 / 32 / 64 / 128 / 256 / 512, then padded gather + SDPA):
    B=64, 8 heads, 4 kv heads, hd 64, lengths 20..400: 17.9 / 11.5 / 9.5 / 8.3 / 10.1 / 26.3, SDPA 11.7;
    B=8, lengths 1800..2200: 17.8 / 13.3 / 9.7 / 8.4 / 8.0 / 7.6, SDPA 11.2. C=16 is the
    one-chunk-per-block "flattened" scheme: no padded work, but per-chunk overhead dominates.
    """
    spans = np.asarray(spans, dtype=np.int64)[None, :]  # (1, B)
    big, small, one_level = _CANDIDATES
    full, tail = spans // big, spans % big
    cost_big_tail = (tail > 0) * (big + CHUNK_OVERHEAD_TOKENS)
    cost_small_tail = (tail + small - 1) // small * (small + CHUNK_OVERHEAD_TOKENS)
    use_small = ~one_level & (cost_small_tail < cost_big_tail)
    cost = full * (big + CHUNK_OVERHEAD_TOKENS) + np.where(use_small, cost_small_tail, cost_big_tail)
    two_groups = use_small.any(axis=1)
    merge = two_groups | (spans > big).any(axis=1)
    total = cost.sum(axis=1) + GROUP_OVERHEAD_TOKENS * two_groups + MERGE_OVERHEAD_TOKENS * merge
    best = int(total.argmin())
    whole = -(-int(spans.max()) // 16) * 16  # one chunk per sequence, as long as the longest: no merge
    if spans.shape[1] * (whole + CHUNK_OVERHEAD_TOKENS) < total[best]:
        return whole, None
    return _PAIRS[best]


_PAIRS = [(c, None) for c in CHUNK_SIZES] + [(c, t) for c in CHUNK_SIZES for t in TAIL_CHUNK_SIZES if t < c]
_CANDIDATES = (np.array([p[0] for p in _PAIRS])[:, None], np.array([p[1] or 1 for p in _PAIRS])[:, None],
               np.array([p[1] is None for p in _PAIRS])[:, None])  # (P, 1) each: C, c, no tail chunks


class DecodePlan:
    """How one decode step's batch is cut up, shared by all its layers (PyTorch path; host arrays).

    Made once per step from the block tables and lengths (``plan_decode``); each attention path
    derives its index tensors from it on first use and keeps them for the other layers:

    - ``chunks`` etc. (token-major keys): the chunking of every sequence's key range. The chunks
      come in groups of one length each (at most two: full chunks, then tail chunks). ``chunks[i]``
      is group i's length and ``biases[i]`` its (n_i, 1, 1, chunk_i) fp32 additive mask (0 for keys,
      -inf for padding); ``seq`` (num_chunks,) every chunk's sequence, group after group; ``slots``
      (sum of n_i * chunk_i,) the flat cache indices of every group's keys in that order, so one
      gather serves all groups.
    - ``key_bags`` (dim-major keys, ``_dim_major_attention``): one embedding bag per (sequence,
      query head, block) for the scores and one per (sequence, query head) for the values.

    Planned on the host (numpy: a few microseconds an op, where this many small torch ops took a
    millisecond a step), then moved to the cache's device.
    """

    def __init__(self, tables: np.ndarray, starts: np.ndarray, lens: np.ndarray, block_size: int,
                 sliding_window: int | None, device: torch.device, chunk_size: int | None = None):
        self.tables, self.starts, self.lens = tables, starts, lens
        self.batch, self.block_size, self.sliding_window = lens.size, block_size, sliding_window
        self.device, self.chunk_size = device, chunk_size
        self._bias: dict[torch.dtype, list[torch.Tensor]] = {}
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._bags: dict[tuple[int, int, int], KeyBags] = {}

    @functools.cached_property
    def _groups(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(chunk length, seq, slots, valid) per group of chunks: see ``_chunk_slots``."""
        tables, starts, lens, block_size = self.tables, self.starts, self.lens, self.block_size
        spans = lens - starts
        big, small = (self.chunk_size, None) if self.chunk_size else choose_chunk_sizes(spans)
        full, tail = spans // big, spans % big
        if small is None:
            n_big, n_small = full + (tail > 0), np.zeros_like(full)
        else:
            n_tail = (tail + small - 1) // small
            use_small = n_tail * (small + CHUNK_OVERHEAD_TOKENS) < (tail > 0) * (big + CHUNK_OVERHEAD_TOKENS)
            n_big = full + ((tail > 0) & ~use_small)
            n_small = np.where(use_small, n_tail, 0)
        groups = [(big, *_chunk_slots(tables, starts, lens, block_size, big, n_big, starts))]
        if small is not None:
            groups.append((small, *_chunk_slots(tables, starts, lens, block_size, small, n_small,
                                                starts + full * big)))
        return [g for g in groups if g[1].size]

    @property
    def chunks(self) -> list[int]:
        return [g[0] for g in self._groups]

    @functools.cached_property
    def seq(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([g[1] for g in self._groups])).to(self.device)

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([g[2].reshape(-1) for g in self._groups])).to(self.device)

    @property
    def biases(self) -> list[torch.Tensor]:
        return self.bias(torch.float32)

    @property
    def num_chunks(self) -> int:
        return sum(g[1].size for g in self._groups)

    @property
    def one_per_sequence(self) -> bool:
        """Chunk b is sequence b's only chunk (one group, a chunk per sequence)."""
        return len(self._groups) == 1 and self.num_chunks == self.batch

    def bias(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each group's (n_i, 1, 1, chunk_i) additive mask in ``dtype``."""
        if dtype not in self._bias:
            self._bias[dtype] = [torch.from_numpy(np.where(g[3], 0.0, -np.inf)[:, None, None, :]).to(self.device, dtype)
                                 for g in self._groups]
        return self._bias[dtype]

    def rows(self, num_kv_heads: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices into a layer's cache viewed as (slots * num_kv_heads, head_dim) rows, for ``_bag_attention``:
        ``keys`` laid out (chunk, kv head, key) group after group; ``values`` the same rows once per query
        head of the kv head, (chunk, kv head, query head, key), one embedding bag per (chunk, query head);
        ``offsets`` where each bag starts."""
        key = (num_kv_heads, group)
        if key not in self._rows:
            heads = np.arange(num_kv_heads)[None, :, None]
            keys, values, sizes = [], [], []
            for chunk, _, slots, _ in self._groups:
                rows = slots[:, None, :] * num_kv_heads + heads  # (n, kv heads, chunk)
                keys.append(rows.reshape(-1))
                values.append(np.broadcast_to(rows[:, :, None, :], rows.shape[:2] + (group, chunk)).reshape(-1))
                sizes.append(np.full(rows.shape[0] * num_kv_heads * group, chunk))
            sizes = np.concatenate(sizes)
            offsets = np.cumsum(sizes) - sizes
            self._rows[key] = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                                    for a in (np.concatenate(keys), np.concatenate(values), offsets))
        return self._rows[key]

    def key_bags(self, num_kv_heads: int, group: int, head_dim: int) -> "KeyBags":
        """The index tensors of ``_dim_major_attention`` for this head layout (see ``KeyBags``)."""
        key = (num_kv_heads, group, head_dim)
        if key not in self._bags:
            self._bags[key] = KeyBags.of(self, num_kv_heads, group, head_dim)
        return self._bags[key]


class KeyBags(NamedTuple):
    """Embedding bags over a dim-major key cache and a token-major value cache (one decode step).

    Sequence b's keys span blocks ``first_b .. first_b + nblk_b - 1`` of its table (``first_b``: the
    block holding its first key in the sliding window, 0 without one). The sequences fall into one
    or two groups (``split_by_length``: a few long ones among many short ones get a group of their
    own); within group g every row is padded to the group's ``W_g = max nblk * block_size`` positions.

    - Scores: bag (b, h, j) for query head h and the j-th of b's blocks, j < max nblk of its group,
      sums ``q[b, h, d] * scale`` times row (block, kv head, d) of the keys viewed as
      (num_blocks * num_kv_heads * head_dim, block_size), over d: the scores of the block's keys.
      ``q_rows`` (one per non-empty bag) picks the (b, h) row of q for the weights; bags with
      j >= nblk_b are empty (score 0, masked). Group g's output is (n_g, num_heads, W_g) as is.
    - ``groups``: per group, its row count, ``W_g`` and ``outside`` (n_g, 1, W_g), True where a
      position is not one of the window's keys.
    - Values: bag (b, h) sums rows (slot, kv head) of the values viewed as (slots * num_kv_heads,
      head_dim) over the W_g positions, weighted by the softmax; a position outside the window
      (probability exactly 0) reads the window's first key, a finite row that is in cache.
    - ``order`` (B,): where each sequence's bags are among the groups' (None when in batch order).
    """

    q_rows: torch.Tensor
    k_index: torch.Tensor
    k_offsets: torch.Tensor
    v_index: torch.Tensor
    v_offsets: torch.Tensor
    groups: tuple[tuple[int, int, torch.Tensor], ...]
    order: torch.Tensor | None

    @classmethod
    def of(cls, plan: DecodePlan, num_kv_heads: int, group: int, head_dim: int) -> "KeyBags":
        tables, starts, lens, bs = plan.tables, plan.starts, plan.lens, plan.block_size
        batch, num_heads = lens.size, num_kv_heads * group
        first = starts // bs
        nblk = (lens + bs - 1) // bs - first
        kv_of = np.arange(num_heads) // group
        # Index arrays fit int32 where the caches and the bags do (half the bytes to build and read).
        rows = tables.max(initial=0) + 1
        positions = batch * num_heads * int(nblk.max()) * max(bs, head_dim)
        itype = np.int32 if max(rows * num_kv_heads * head_dim, rows * bs * num_kv_heads, positions) < 2**31 else np.int64
        parts = {name: [] for name in ("q_rows", "k_index", "k_sizes", "v_index", "v_sizes")}
        groups = []
        members = split_by_length(nblk, num_heads * bs)
        for seqs in members:
            n, width = seqs.size, int(nblk[seqs].max())
            cols = np.minimum(first[seqs, None] + np.arange(width), tables.shape[1] - 1)
            blocks = tables[seqs[:, None], cols]  # (n, width); entries past nblk unused
            # scores: bags (b, h, j)
            real = np.broadcast_to((np.arange(width) < nblk[seqs, None])[:, None, :], (n, num_heads, width))
            base = (blocks[:, None, :] * num_kv_heads + kv_of[None, :, None]) * head_dim  # (n, nh, width)
            parts["k_index"].append((base[real].astype(itype)[:, None] + np.arange(head_dim, dtype=itype)).reshape(-1))
            parts["k_sizes"].append(real.reshape(-1).astype(itype) * head_dim)
            parts["q_rows"].append(np.broadcast_to((seqs * num_heads)[:, None, None] + np.arange(num_heads)[None, :, None],
                                                   real.shape)[real])
            # the window within each padded row: positions [lo, hi) of W_g
            lo, hi = starts[seqs] - first[seqs] * bs, lens[seqs] - first[seqs] * bs
            pos = np.arange(width * bs)
            outside = (pos < lo[:, None]) | (pos >= hi[:, None])  # (n, W_g)
            # values: bag (b, h) over all W_g positions; one outside the window reads the window's first
            # key (finite, weighted by exactly 0): measured faster than compacting the bags to the window
            slot = blocks[:, pos // bs] * bs + pos % bs  # (n, W_g)
            slot = np.where(outside, slot[np.arange(n), lo][:, None], slot)
            parts["v_index"].append((slot[:, None, :] * num_kv_heads + kv_of[None, :, None]).astype(itype).reshape(-1))
            parts["v_sizes"].append(np.full(n * num_heads, width * bs, dtype=itype))
            groups.append((n, width * bs, outside[:, None, :]))
        q_rows, k_index, k_sizes, v_index, v_sizes = (np.concatenate(parts[k]) for k in parts)
        k_offsets = np.cumsum(k_sizes, dtype=itype) - k_sizes
        v_offsets = np.cumsum(v_sizes, dtype=itype) - v_sizes
        device = plan.device

        def put(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        order = None if len(members) == 1 else put(np.argsort(np.concatenate(members), kind="stable"))
        return cls(put(q_rows), put(k_index), put(k_offsets), put(v_index), put(v_offsets),
                   tuple((n, width, put(outside)) for n, width, outside in groups), order)


SPLIT_MIN_SAVED = 8192
"""A second group of sequences costs a few more ops per layer, worth about this many padded
(position, query head) pairs of the softmax and the value bags."""


def split_by_length(nblk: np.ndarray, per_block: int) -> list[np.ndarray]:
    """The rows of a batch in one group, or two (the longer ones first), as index arrays in batch order.

    Each group is padded to its longest member's ``nblk`` blocks, a padded block costing
    ``per_block`` (query heads x block_size) pairs; two groups when the best threshold saves at least
    ``SPLIT_MIN_SAVED`` pairs (a few long sequences among many short ones: one 4000-key sequence
    would otherwise pad 63 sequences of 40 keys to 4000)."""
    everyone = [np.arange(nblk.size)]
    values = np.unique(nblk)
    if values.size < 2:
        return everyone
    longest, ordered = int(values[-1]), np.sort(nblk)
    thresholds = values[:-1]
    n_long = nblk.size - np.searchsorted(ordered, thresholds, side="right")
    cost = n_long * longest + (nblk.size - n_long) * thresholds
    best = int(cost.argmin())
    if (nblk.size * longest - cost[best]) * per_block < SPLIT_MIN_SAVED:
        return everyone
    long = nblk > thresholds[best]
    return [np.flatnonzero(long), np.flatnonzero(~long)]


def plan_decode(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                sliding_window: int | None = None, chunk_size: int | None = None) -> DecodePlan:
    """The plan of a decode step: every sequence's key range [start, seq_len), for all layers.

    chunk_size forces one chunk length for all keys (token-major path); None picks
    ``choose_chunk_sizes``."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
    _validate_lengths(seq_lens, block_tables.shape[1] * block_size)
    tables = block_tables.cpu().numpy().astype(np.int64)
    lens = seq_lens.cpu().numpy().astype(np.int64)
    starts = np.maximum(lens - sliding_window, 0) if sliding_window else np.zeros_like(lens)
    return DecodePlan(tables, starts, lens, block_size, sliding_window, block_tables.device, chunk_size)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                               scale: float | None = None, sliding_window: int | None = None,
                               chunk_size: int | None = None) -> torch.Tensor:
    """``decode_attention`` in PyTorch (same arguments); chunk_size None picks ``choose_chunk_sizes``."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, None)
    plan = plan_decode(block_tables, seq_lens, k_cache.shape[1], sliding_window, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _reference(q, k_cache, v_cache, plan, scale)


def _reference(q, k_cache, v_cache, plan: DecodePlan, scale):
    if q.device.type == "cpu" and q.dtype in _BAG_DTYPES and v_cache.is_contiguous():
        if keys_dim_major(k_cache):
            return _dim_major_attention(q, k_cache, v_cache, plan, scale)
        if k_cache.is_contiguous():
            return _bag_attention(q, k_cache, v_cache, plan, scale)
    return _flash_chunks(q, k_cache, v_cache, plan, scale)


_BAG_DTYPES = (torch.float32, torch.float64)


DIM_MAJOR_MAX_GROUP = 4
"""The dim-major path reads a kv head's keys once per query head, the token-major one once per kv
head: benchmarks/decode_attention.py (fp32, 2 threads) measured dim-major 1.3-1.6x faster at 1 and 2
query heads per kv head, 1.1x at 4, and 0.8-0.9x at 8."""


def key_layout_for(device: torch.device, dtype: torch.dtype, group: int = 1) -> str:
    """The key cache layout decode_attention is fastest with for ``group`` query heads per kv head:
    "dim" on the CPU in fp32 where the compiled kernel is available (any group), and for the two-bag
    path (``_dim_major_attention``) in fp32/fp64 up to ``DIM_MAJOR_MAX_GROUP``, both without the
    Triton interpreter; "token" elsewhere (the Triton kernel reads a block's keys token by token;
    ``_flash_chunks`` gathers them so)."""
    interpreted = triton_available() and interpreting() and device.type == "cpu"
    if device.type == "cpu" and dtype == torch.float32 and not interpreted and native.available():
        return "dim"  # the compiled kernel reads each kv head's keys once for its whole group
    cpu_bags = device.type == "cpu" and dtype in _BAG_DTYPES and not interpreted
    return "dim" if cpu_bags and group <= DIM_MAJOR_MAX_GROUP else "token"


def empty_key_cache(lead: tuple[int, ...], num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                    layout: str, **factory) -> torch.Tensor:
    """An uninitialised key cache of shape lead + (num_blocks, block_size, num_kv_heads, head_dim), stored
    token-major (``layout="token"``: contiguous) or dim-major (``"dim"``: see ``keys_dim_major``)."""
    if layout == "token":
        return torch.empty(lead + (num_blocks, block_size, num_kv_heads, head_dim), **factory)
    if layout != "dim":
        raise ValueError(f"key cache layout must be 'token' or 'dim', got {layout!r}")
    return torch.empty(lead + (num_blocks, num_kv_heads, head_dim, block_size), **factory).movedim(-1, -3)


def key_storage(k_cache: torch.Tensor) -> torch.Tensor:
    """A key cache (..., num_blocks, block_size, kv heads, head_dim) in its storage order, contiguous:
    itself when token-major, (..., num_blocks, kv heads, head_dim, block_size) when dim-major."""
    return k_cache if k_cache.is_contiguous() else k_cache.movedim(-3, -1)


def _dim_major_attention(q, k_cache, v_cache, plan: DecodePlan, scale):
    """The CPU fp32 path for a dim-major key cache: two embedding bags, nothing gathered.

    With the keys stored (block, kv head, dim, key), one block's scores for one query head are a
    weighted sum of head_dim rows of block_size keys, the query's components the weights: an
    embedding bag straight over the cache, as the weighted sum of values already is. A layer is
    then a few ops (see ``KeyBags``) whatever the mix of lengths, with padding only in the softmax
    and in value bags that re-read a cached row, each group of sequences padded to its longest
    (a 4000-key straggler among 63 sequences of 40 keys: 0.51 ms, against 0.73 ms token-major and
    2.0 ms with one group; fp32, 2 threads). Measured against
    ``_bag_attention`` on the rollout benchmark's shapes (fp32, 2 threads, 4 query / 2 kv heads,
    hd 64, block 16): 64 sequences of 40..300 keys 0.52 vs 1.05 ms, 64 x 250 keys 0.76 vs 0.93 ms,
    one sequence of 70 keys 34 vs 47 us; the whole ragged rollout benchmark 2.96 vs 3.45 s (with
    the decode step's other changes). Every query head reads its kv head's keys itself, so with many
    query heads per kv head the token-major path wins (``DIM_MAJOR_MAX_GROUP``).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    bags = plan.key_bags(num_kv_heads, num_heads // num_kv_heads, head_dim)
    keys = key_storage(k_cache).view(-1, block_size)  # (block, kv head, dim) rows of block_size keys
    weights = (q * scale).reshape(-1, head_dim).index_select(0, bags.q_rows).view(-1)
    scores = F.embedding_bag(bags.k_index, keys, bags.k_offsets, mode="sum", per_sample_weights=weights).view(-1)
    probs, start = [], 0
    for n, width, outside in bags.groups:
        # masked_fill, not an additive mask: a block's unwritten slots may hold NaN (torch.empty)
        part = scores[start:start + n * num_heads * width].view(n, num_heads, width)
        probs.append(torch.softmax(part.masked_fill_(outside, float("-inf")), dim=-1).view(-1))
        start += n * num_heads * width
    out = F.embedding_bag(bags.v_index, v_cache.view(-1, head_dim), bags.v_offsets, mode="sum",
                          per_sample_weights=probs[0] if len(probs) == 1 else torch.cat(probs))
    out = out.view(batch, num_heads, head_dim)
    return out if bags.order is None else out.index_select(0, bags.order)


def _bag_attention(q, k_cache, v_cache, plan: DecodePlan, scale):
    """The CPU fp32 path: scores from gathered keys, values never gathered.

    Keys are gathered as (chunk, kv head, key) rows of head_dim and scored with one batched matmul
    per group; the softmax runs over each sequence's keys across its chunks; the weighted sum of
    values is ``F.embedding_bag`` straight over the paged value cache (one bag of ``chunk`` rows per
    chunk and query head, the probabilities as per-sample weights), so values are read once and
    never copied. Measured against gathering both and ATen's fused flash kernel
    (benchmarks/decode_attention.py shapes, fp32, 2 threads): 1.2-2.8x faster.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    key_rows, value_rows, offsets = plan.rows(num_kv_heads, group)
    keys = k_cache.reshape(-1, head_dim).index_select(0, key_rows)
    q_chunks = q.reshape(batch, num_kv_heads, group, head_dim)
    if not plan.one_per_sequence:
        q_chunks = q_chunks.index_select(0, plan.seq)
    scores, key0, chunk0 = [], 0, 0
    for chunk, bias in zip(plan.chunks, plan.bias(q.dtype)):
        n = bias.shape[0]
        k = keys[key0:key0 + n * num_kv_heads * chunk].view(n, num_kv_heads, chunk, head_dim)
        scores.append(torch.matmul(q_chunks[chunk0:chunk0 + n], k.transpose(-1, -2)).mul_(scale).add_(bias))
        key0, chunk0 = key0 + n * num_kv_heads * chunk, chunk0 + n  # (n, kv heads, group, chunk) above
    if plan.one_per_sequence:
        weights = torch.softmax(scores[0], dim=-1).reshape(-1)
    else:  # softmax over each sequence's keys, across its chunks and groups
        seq = plan.seq
        chunk_max = torch.cat([s.amax(dim=-1) for s in scores])  # (num_chunks, kv heads, group)
        seq_max = torch.full((batch, num_kv_heads, group), float("-inf"), dtype=q.dtype, device=q.device)
        seq_max = seq_max.scatter_reduce_(0, seq.view(-1, 1, 1).expand_as(chunk_max), chunk_max, "amax")
        shift = seq_max.index_select(0, seq)[..., None]
        exps, chunk0 = [], 0
        for s in scores:
            exps.append(s.sub_(shift[chunk0:chunk0 + s.shape[0]]).exp_())
            chunk0 += s.shape[0]
        total = torch.zeros_like(seq_max).index_add_(0, seq, torch.cat([e.sum(dim=-1) for e in exps]))
        inverse = total.reciprocal_().index_select(0, seq)[..., None]
        weights, chunk0 = [], 0
        for e in exps:
            weights.append(e.mul_(inverse[chunk0:chunk0 + e.shape[0]]).reshape(-1))
            chunk0 += e.shape[0]
        weights = torch.cat(weights)
    out = F.embedding_bag(value_rows, v_cache.reshape(-1, head_dim), offsets, mode="sum",
                          per_sample_weights=weights)  # (num_chunks * num_heads, head_dim)
    if plan.one_per_sequence:
        return out.view(batch, num_heads, head_dim)
    acc = torch.zeros(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    return acc.index_add_(0, plan.seq, out.view(-1, num_heads, head_dim))


def _flash_chunks(q, k_cache, v_cache, plan: DecodePlan, scale):
    """Other dtypes and devices: gather keys and values per chunk, ATen's fused attention per group,
    chunks merged by their log-sum-exps (flash-decoding with C-token splits)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    seq = plan.seq
    # one gather per cache for all groups; group i is a strided (n_i, kv heads, chunk_i, hd) view of it
    keys, values = (_gather_slots(cache, plan.slots) for cache in (k_cache, v_cache))
    q_chunks = q.reshape(batch, num_kv_heads, group, head_dim)
    if not plan.one_per_sequence:
        q_chunks = q_chunks.index_select(0, seq)
    outs, lses, key0, chunk0 = [], [], 0, 0
    for chunk, bias in zip(plan.chunks, plan.bias(q.dtype)):
        n = bias.shape[0]

        def part(tokens):
            return tokens[key0:key0 + n * chunk].view(n, chunk, num_kv_heads, head_dim).transpose(1, 2)

        out, lse = _chunk_attention(q_chunks[chunk0:chunk0 + n], part(keys), part(values), bias, scale)
        outs.append(out)
        lses.append(lse)
        key0, chunk0 = key0 + n * chunk, chunk0 + n
    if plan.one_per_sequence:  # nothing to merge
        return outs[0].to(q.dtype).reshape(batch, num_heads, head_dim)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
    return _merge_chunks(out, lse, seq, batch).to(q.dtype).reshape(batch, num_heads, head_dim)


def _gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(len(slots), num_kv_heads, head_dim): the cache's tokens at flat ``slots``, in any layout."""
    if cache.is_contiguous():
        return cache.flatten(0, 1).index_select(0, slots)
    block_size = cache.shape[1]
    return cache[slots // block_size, slots % block_size]


def _chunk_slots(tables: np.ndarray, starts: np.ndarray, lens: np.ndarray, block_size: int, chunk: int,
                 counts: np.ndarray, first_key: np.ndarray):
    """``counts[b]`` chunks of ``chunk`` keys for every sequence b, from key ``first_key[b]`` on,
    flattened over the batch (host arrays).

    Returns seq (num_chunks,): the owning sequence; slots (num_chunks, chunk): flat cache indices
    (block * block_size + offset); valid (num_chunks, chunk): which slots are real keys. Padding
    slots re-read the sequence's first key, so no slot outside the sequence is ever read.
    """
    seq = np.repeat(np.arange(lens.size), counts)
    first_chunk = np.cumsum(counts) - counts
    chunk_start = first_key[seq] + (np.arange(seq.size) - first_chunk[seq]) * chunk
    pos = chunk_start[:, None] + np.arange(chunk)  # (num_chunks, chunk)
    valid = pos < lens[seq, None]
    pos = np.where(valid, pos, starts[seq, None])
    return seq, tables[seq[:, None], pos // block_size] * block_size + pos % block_size, valid


def _chunk_attention(q, k, v, bias, scale: float):
    """Per chunk: softmax attention and its natural-log sum-exp.

    q (N, kvh, g, hd), k/v (N, kvh, C, hd), bias (N, 1, 1, C) -> out (N, kvh, g, hd), lse (N, kvh, g).
    On CPU, ATen's fused flash kernel (fp32 softmax and accumulation; the only torch op that returns
    the log-sum-exp) is 2-3x faster than the matmul/softmax form below.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale)[:2]
        return out, lse
    return _chunk_attention_math(q, k, v, bias, scale)


def _chunk_attention_math(q, k, v, bias, scale: float):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse


def _merge_chunks(out, lse, seq, batch: int):
    """Softmax-weighted sum of each sequence's chunk outputs: weights exp(lse - max lse) (fp32)."""
    shape = (batch,) + tuple(lse.shape[1:])
    index = seq.view(-1, 1, 1).expand_as(lse)
    lse_max = torch.full(shape, float("-inf"), device=lse.device).scatter_reduce_(0, index, lse, "amax")
    weights = torch.exp(lse - lse_max.index_select(0, seq))                    # (num_chunks, kvh, g)
    total = torch.zeros(shape, device=lse.device).index_add_(0, seq, weights)
    acc = torch.zeros(shape + (out.shape[-1],), device=lse.device)
    acc.index_add_(0, seq, out.float() * weights[..., None])
    return acc / total[..., None]


# ---- Triton path ----------------------------------------------------------------------------------

MIN_SPLIT_KEYS = 256
"""A split shorter than this costs more in merging than it gains in parallelism."""


def choose_num_splits(max_context: int, num_programs: int, target_programs: int) -> int:
    """Key splits per sequence: enough programs (B * num_kv_heads * splits) to reach
    ``target_programs`` (about two waves of the GPU's SMs), but no split under MIN_SPLIT_KEYS keys;
    a power of two, at most 64."""
    wanted = math.ceil(target_programs / max(num_programs, 1))
    limit = max(1, math.ceil(max_context / MIN_SPLIT_KEYS))
    return max(1, min(_next_power_of_2(wanted), limit, 64))


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 128


def _decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                             num_splits):
    """Launch the split kernel on grid (B, num_kv_heads, splits), then the merge kernel if splits > 1.

    The split count is chosen from block_tables' width (the longest context it can address), not from
    seq_lens, so no device-to-host copy is needed: trim block_tables to the longest sequence's blocks
    to get the best split count.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if not q.is_cuda:   # the interpreter: the value checks cost no synchronisation here
        _validate_lengths(seq_lens, block_tables.shape[1] * block_size)
    if num_splits is None:
        num_splits = choose_num_splits(block_tables.shape[1] * block_size, batch * num_kv_heads,
                                       _target_programs(q.device))
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty_like(q)
    if num_splits > 1:
        part_max = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device,
                               dtype=torch.float32)
    else:  # unused: the split kernel writes `out` itself
        part_max = part_sum = part_acc = out
    block_d = max(16, triton.next_power_of_2(head_dim))
    # tl.dot needs >= 16 rows: the group of query heads sharing a kv head is padded to 16 (masked
    # rows of zeros). Decode is bandwidth-bound, so the idle rows cost no memory traffic, and one
    # program serving the whole group reads each K/V tile once instead of `group` times.
    block_g = max(16, triton.next_power_of_2(group))
    block_n = 64 if block_d <= 64 else 32   # keys per tile: registers hold (block_n x block_d) K and V
    # fp32 inputs: exact fp32 dots (no TF32). The interpreter multiplies bf16 as raw bits, so there
    # every dtype is upcast.
    dot_fp32 = q.dtype == torch.float32 or not q.is_cuda
    # Any cache layout goes by its strides; Triton specialises a stride of 1 (token-major's head_dim
    # axis) to a constant, so the common layout compiles to contiguous loads.
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_max, part_sum, part_acc,
        scale * _LOG2E, sliding_window or _NO_WINDOW, num_splits, head_dim, block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_tables.stride(0),
        GROUP=group, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=num_splits > 1, DOT_FP32=dot_fp32,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part_max, part_sum, part_acc, out, num_splits, head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


_LOG2E = 1.4426950408889634
_NO_WINDOW = 2**31 - 1   # seq_len - window < 0: attend from position 0

if triton_available():

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr, acc_ptr,
        scale_log2, window, num_splits, head_dim, block_size,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_tb,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        """One (sequence, kv head, split): online softmax over the split's keys for the GROUP query
        heads of that kv head. Scores are in log2 units (exp2)."""
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        start = tl.maximum(seq_len - window, 0)
        # Splits of whole tiles, so each split's tiles start on a tile boundary of its range.
        per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP
        dim_ok = dims < head_dim
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table = tables_ptr + b * stride_tb
        for tile in range(lo, hi, BLOCK_N):
            pos = tile + tl.arange(0, BLOCK_N)
            key_ok = pos < hi
            # Masked lanes never touch the table or the cache: entries past the last block may be
            # garbage (-1), and unwritten cache slots may hold NaN.
            block = tl.load(table + pos // block_size, mask=key_ok, other=0).to(tl.int64)
            slot = pos % block_size
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + (block * stride_kb + slot * stride_kt + kv_head * stride_kh)[:, None]
                        + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (block * stride_vb + slot * stride_vt + kv_head * stride_vh)[:, None]
                        + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if DOT_FP32:
                scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(key_ok[None, :], scores * scale_log2, float("-inf"))  # (BLOCK_G, BLOCK_N)
            new_max = tl.maximum(row_max, tl.max(scores, 1))   # finite: every tile has a key
            alpha = tl.exp2(row_max - new_max)
            p = tl.exp2(scores - new_max[:, None])
            row_sum = row_sum * alpha + tl.sum(p, 1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            row_max = new_max

        out_mask = row_ok[:, None] & dim_ok[None, :]
        if SPLIT:
            part = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split   # (B, num_heads, splits)
            tl.store(max_ptr + part, row_max, mask=row_ok)
            tl.store(sum_ptr + part, row_sum, mask=row_ok)
            tl.store(acc_ptr + part[:, None] * head_dim + dims[None, :], acc, mask=out_mask)
        else:
            out = acc / row_sum[:, None]
            tl.store(out_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _merge_splits_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, num_splits, head_dim,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (sequence, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. Empty splits
        (a short sequence) have m_s = -inf and weigh 0; split 0 is never empty."""
        row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, BLOCK_D)
        split_ok = splits < num_splits
        part = row * num_splits + splits
        part_max = tl.load(max_ptr + part, mask=split_ok, other=float("-inf"))
        part_sum = tl.load(sum_ptr + part, mask=split_ok, other=0.0)
        weight = tl.exp2(part_max - tl.max(part_max, 0))
        acc = tl.load(acc_ptr + part[:, None] * head_dim + dims[None, :],
                      mask=split_ok[:, None] & (dims < head_dim)[None, :], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(part_sum * weight, 0)
        tl.store(out_ptr + row * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)
