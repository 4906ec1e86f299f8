"""The paged KV cache: fixed-size blocks, a reference-counted block allocator, and the attention
backends through which the model reads and writes it.

Layout. Keys and values of all layers live in two tensors seen as
(num_layers, num_blocks, block_size, num_kv_heads, head_dim), allocated once per engine and
reused across calls (no per-step allocation). A sequence's tokens are addressed through its row
of a block table: token ``p`` lives in block ``table[p // block_size]`` at offset
``p % block_size``; its flat slot is ``block * block_size + offset``. Values are stored in that
order; keys in the order decode attention reads fastest (``key_layout_for``): token-major as the
values, or on the CPU dim-major, each block's keys dimension by dimension (num_blocks,
num_kv_heads, head_dim, block_size), behind the same logical shape.

Sharing. Blocks carry reference counts: the ``n`` samples of one prompt point at the same prompt
blocks (count ``n``), and only the last, partially filled prompt block is copied for each sample
(copy-on-write at fork time, the one write every sample is about to make). A block returns to the
free list when its count drops to zero. Allocation and freeing work on tensors of block ids, one
call per step for all sequences.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hfrl.models.llama import AttentionBackend, PackedAttention
from hfrl_kernels import native, use_triton
from hfrl_kernels.decode_attention import DecodePlan, decode_attention, empty_key_cache, key_storage, plan_decode


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (what the kernel could hand out without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the driver's view on GPUs, MemAvailable on the host.

    On CUDA, the caching allocator's unused blocks (the previous rollout's KV cache, the training
    step's activations, optimizer states offloaded by the hybrid engine) are returned to the driver
    first: cudaMemGetInfo counts them as used, and a budget taken as a fraction of it would shrink
    from the second rollout on."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _available_host_bytes()


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int  # local to this rank under tensor parallelism
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Keys and values of one block across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class PagedKVCache:
    """Block storage plus a reference-counted free list; every method is batched over sequences."""

    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device, key_layout: str = "token"):
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got num_blocks={num_blocks}")
        self.shape, self.num_blocks, self.device, self.key_layout = shape, num_blocks, device, key_layout
        dims = (shape.num_layers, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        # k and v: (layers, blocks, block_size, kv heads, head_dim) views, whatever the storage order
        self.k = empty_key_cache(dims[:1], *dims[1:], key_layout, dtype=shape.dtype, device=device)
        self.v = torch.empty(dims, dtype=shape.dtype, device=device)
        self.refcount = torch.zeros(num_blocks, dtype=torch.int32)
        self.reset()

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._top

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.shape.bytes_per_block

    def reset(self) -> None:
        """Forget every allocation (after each call, failed or not); the storage stays."""
        self.refcount.zero_()
        self.peak_used = 0
        # Free list as a stack, popped from the top. Host tensors: the scheduler runs on the CPU.
        self._free = torch.arange(self.num_blocks - 1, -1, -1, dtype=torch.int64)
        self._top = self.num_blocks

    def allocate(self, count: int) -> torch.Tensor:
        """``count`` fresh blocks (refcount 1), int64 (count,)."""
        if count > self._top:
            raise RuntimeError(f"KV cache allocator: {count} blocks asked, {self._top} free "
                               "(the scheduler must check num_free first)")
        blocks = self._free[self._top - count:self._top].clone()
        self._top -= count
        self.refcount[blocks] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def share(self, blocks: torch.Tensor, times: int) -> None:
        """Add ``times`` references to each of ``blocks`` (n samples pointing at one prompt block)."""
        self.refcount.index_add_(0, blocks, torch.full_like(blocks, times, dtype=torch.int32))

    def release(self, blocks: torch.Tensor) -> None:
        """Drop one reference per entry of ``blocks`` (repeats allowed); blocks reaching 0 are freed."""
        if blocks.numel() == 0:
            return
        self.refcount.index_add_(0, blocks, torch.full_like(blocks, -1, dtype=torch.int32))
        touched = blocks.unique()
        counts = self.refcount[touched]
        if bool((counts < 0).any()):
            raise RuntimeError("KV cache allocator: a block was released more often than referenced")
        freed = touched[counts == 0]
        self._free[self._top:self._top + freed.numel()] = freed
        self._top += freed.numel()

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the contents of blocks ``src`` into ``dst`` in every layer (copy-on-write)."""
        if src.numel():
            index, src = dst.to(self.device), src.to(self.device)
            for cache in (key_storage(self.k), self.v):  # storage order: dim 1 is the block either way
                cache.index_copy_(1, index, cache.index_select(1, src))

    def locate(self, slots: torch.Tensor) -> "Slots":
        """Where tokens at flat ``slots`` (T,) go: computed once per step for every layer's ``write``."""
        if self.key_layout == "dim":
            return Slots(slots, slots // self.block_size, slots % self.block_size)
        return Slots(slots, None, None)

    def write(self, layer: int, where: "Slots", k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, nkv, hd) of one layer at ``where`` (``locate``)."""
        keys, values = self.k[layer], self.v[layer]
        if native.writes(keys, values, k, v):
            native.write_kv(keys, values, where.slots, k, v)
            return
        shape = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        if where.blocks is None:
            keys.view(shape).index_copy_(0, where.slots, k.to(keys.dtype))
        else:  # a strided scatter into the dim-major storage (2x faster than a flat index_copy_ there)
            keys.index_put_((where.blocks, where.offsets), k.to(keys.dtype))
        values.view(shape).index_copy_(0, where.slots, v.to(values.dtype))


@dataclass(frozen=True)
class Slots:
    """Flat slots (T,) of T tokens; for a dim-major key cache also their blocks and offsets."""

    slots: torch.Tensor
    blocks: torch.Tensor | None
    offsets: torch.Tensor | None


class PrefillAttention(AttentionBackend):
    """Prefill of a packed row of whole sequences: store every token's K/V, attend within each span.

    A sequence prefilled here has no cached prefix (a new prompt, or a preempted sequence
    recomputed from its tokens), so attention is the packed causal attention of the training path.
    """

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, spans: list[tuple[int, int]]):
        self.cache, self.slots, self.spans = cache, cache.locate(slots), spans
        self._packed: dict[int | None, PackedAttention] = {}

    def attend(self, layer_idx, q, k, v, sliding_window):
        self.cache.write(layer_idx, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        packed = self._packed.get(sliding_window)
        if packed is None:
            packed = self._packed[sliding_window] = PackedAttention.build(self.spans, q.device, sliding_window)
        return packed.attend(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


class DecodeAttention(AttentionBackend):
    """One new token per sequence: store its K/V, attend over the sequence's cached blocks."""

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor):
        self.cache, self.slots, self.block_tables, self.seq_lens = cache, cache.locate(slots), block_tables, seq_lens
        self._plans: dict[int | None, DecodePlan] = {}  # one per sliding window, shared by the layers

    def attend(self, layer_idx, q, k, v, sliding_window):
        out = self.attend_rows(layer_idx, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                               sliding_window)  # (N, nh, hd)
        return out.transpose(0, 1)[None]  # (1, nh, N, hd)

    def takes_qkv(self) -> bool:
        """Whether ``attend_qkv`` can serve this step (the compiled kernel and a dim-major fp32 cache)."""
        cache = self.cache
        return (cache.device.type == "cpu" and cache.shape.dtype == torch.float32 and cache.key_layout == "dim"
                and native.available())

    def attend_qkv(self, layer_idx: int, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                   sin: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
        """One layer's decode attention from its fused projection qkv (N, (nh + 2 nkv) hd), unrotated:
        rotate q and k with the RoPE tables (max_len, hd), store k and v, attend -> (N, nh hd)
        (``hfrl_kernels.native.attend_qkv``; only where ``takes_qkv``)."""
        head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
        return native.attend_qkv(qkv, num_heads, num_kv_heads, cos, sin, self.cache.k[layer_idx],
                                 self.cache.v[layer_idx], self.block_tables, self.seq_lens, head_dim ** -0.5,
                                 sliding_window)

    def attend_rows(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    sliding_window: int | None) -> torch.Tensor:
        """``attend`` with one row per sequence: q (N, nh, hd), k and v (N, nkv, hd) -> (N, nh, hd)."""
        self.cache.write(layer_idx, self.slots, k, v)
        plan = None
        if not use_triton(q) and not native.supports(q, self.cache.k[layer_idx], self.cache.v[layer_idx]):
            plan = self._plans.get(sliding_window)
            if plan is None:
                plan = self._plans[sliding_window] = plan_decode(self.block_tables, self.seq_lens,
                                                                 self.cache.block_size, sliding_window)
        return decode_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], self.block_tables,
                                self.seq_lens, sliding_window=sliding_window, plan=plan)
