"""hfrl's generation engine: paged KV cache, continuous batching, prefix-shared samples, TP generation.

    engine = RolloutEngine(model, tp_group=gen_tp_group, kv_cache_bytes=2 << 30)
    out = engine.generate([[1, 5, 9], [1, 7]], SamplingParams(n=4, temperature=1.0, seed=0,
                                                               max_new_tokens=128, stop_token_ids=[2]))
    out.samples[0].token_ids, out.samples[0].log_probs, out.samples[0].finish_reason
    out.stats  # blocks, peak KV bytes, preemptions, tokens/s

The engine runs inside the training ranks on whatever model and groups the caller hands it (the
hybrid engine gives it the resharded actor); it owns nothing but its KV cache.

Scheduling (vLLM's, in a few tensors). Each step is either a *prefill* of newly admitted sequences,
packed into one row, or a *decode* step of every running sequence, one token each. Requests wait in
FIFO order and are admitted when a batch slot and their blocks are free (keeping one free block per
running sequence in reserve, so the next decode step rarely has to preempt). A sequence that finishes
frees its blocks at once and the next waiting one is admitted before the following decode step, so
no decode step ever computes a finished or padded sequence. When a decode step needs more blocks
than are free, the most recently admitted sequences are preempted: their blocks are freed and they
wait at the front of the queue to be recomputed (prompt + tokens so far, prefilled again).

The ``n`` samples of a prompt are prefilled once; they share the prompt's blocks and each gets its
own copy of the last, partial block. Sampling is counter-based per sample (``sampling.py``), so
the tokens of a seeded request do not depend on batching or preemption.

Tensor parallelism. Every rank of ``tp_group`` runs the same schedule on its own heads: inputs are
checked to be identical across the group, the cache size is the group's minimum, the full-vocab
logits are all-gathered and the sampled tokens broadcast from the group's first rank, so no rank can
ever hold a different token. Data-parallel replicas are separate engines with their own prompts.
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from hfrl.models.llama import CausalLM
from hfrl.rollout.decode import DecodeForward, PackedLinear
from hfrl_kernels.decode_attention import key_layout_for
from hfrl.rollout.kv_cache import CacheShape, DecodeAttention, PagedKVCache, PrefillAttention, free_device_bytes
from hfrl.rollout.sampling import (
    GREEDY_BELOW, SamplingFlags, SamplingParams, as_int, as_real, sample, spread_seeds, token_log_probs,
)

FINISH_REASONS = ("stop", "length")


@dataclass
class Sample:
    """One response: ``token_ids`` (the stop token included when it ended the response),
    ``log_probs`` (fp32, one per token), ``finish_reason`` "stop" or "length"."""

    prompt_index: int
    index: int  # which of the prompt's n samples
    token_ids: list[int]
    log_probs: torch.Tensor
    finish_reason: str


@dataclass
class RolloutOutput:
    samples: list[Sample]  # prompt-major: all samples of prompt 0, then of prompt 1, ...
    stats: dict[str, float] = field(default_factory=dict)

    def padded(self, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
        """Right-padded tensors of all samples: ``responses`` (N, L) int64, ``response_log_probs``
        (N, L) fp32, ``response_mask`` (N, L) int64, ``response_lengths`` (N,) int64."""
        lengths = torch.tensor([len(s.token_ids) for s in self.samples], dtype=torch.int64)
        width = int(lengths.max()) if len(self.samples) else 0
        responses = torch.full((len(self.samples), width), pad_token_id, dtype=torch.int64)
        log_probs = torch.zeros(len(self.samples), width)
        for row, s in enumerate(self.samples):
            responses[row, :len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.int64)
            log_probs[row, :len(s.token_ids)] = s.log_probs
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        return dict(responses=responses, response_log_probs=log_probs, response_mask=mask,
                    response_lengths=lengths)


@dataclass
class _Entry:
    """Waiting work: tokens to prefill and the samples that continue from them (n > 1: a shared prompt)."""

    samples: list[int]
    tokens: torch.Tensor  # (L,) int64


class RolloutEngine:
    """Generates from a (possibly tensor-parallel) hfrl ``CausalLM`` with a paged KV cache.

    kv_cache_bytes: the cache's size; None takes ``kv_cache_fraction`` of the device's free memory
    when the cache is first allocated (on the host, of MemAvailable). The cache is never larger than
    ``max_num_seqs`` sequences of ``max_model_len`` tokens could use. Under TP every rank uses the
    group's smallest size. ``release()`` frees it; the next ``generate`` allocates it again.
    """

    def __init__(self, model: CausalLM, *, tp_group: dist.ProcessGroup | None = None, block_size: int = 16,
                 kv_cache_bytes: int | None = None, kv_cache_fraction: float = 0.5, max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None):
        if not isinstance(model, CausalLM) or model.embed_tokens is None or model.lm_head is None:
            raise ValueError("RolloutEngine needs a whole CausalLM (embed_tokens to lm_head); pipeline-parallel "
                             "generation (gen_pp > 1) is not supported: generate with gen_pp = 1")
        def positive_int(name, value, need):
            if as_int(value) is None or as_int(value) < 1:
                raise ValueError(f"{name}={value!r} must be {need}")

        positive_int("block_size", block_size, "a positive number of tokens (16 is usual)")
        positive_int("max_num_seqs", max_num_seqs, "a positive integer (sequences decoded at once)")
        if kv_cache_bytes is not None:
            positive_int("kv_cache_bytes", kv_cache_bytes, "a positive number of bytes, or None for kv_cache_fraction")
        if as_real(kv_cache_fraction) is None or not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction={kv_cache_fraction!r} must be in (0, 1]")
        config = model.config
        if config.rope_type == "dynamic":
            raise ValueError("rope_type 'dynamic' (dynamic NTK) rescales RoPE by the longest sequence of the whole "
                             "batch, so a response would depend on what it was batched with; generate with a "
                             "static RoPE scaling (linear, yarn, llama3) instead")
        self.model, self.config, self.tp_group = model, config, tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.vocab_size = config.vocab_size
        limit = config.max_position_embeddings
        if max_model_len is not None:
            positive_int("max_model_len", max_model_len, f"an integer in [2, max_position_embeddings={limit}]")
            if not 2 <= max_model_len <= limit:
                raise ValueError(f"max_model_len={max_model_len} must be in [2, max_position_embeddings={limit}] "
                                 "(beyond it RoPE extrapolates); leave it None for the model's limit")
        self.max_model_len = int(max_model_len or limit)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must leave room for a prompt and a token")
        if max_num_batched_tokens is not None:
            positive_int("max_num_batched_tokens", max_num_batched_tokens, "a positive number of tokens")
        # Prefill at most this many tokens per step (one sequence always goes, however long).
        self.max_num_batched_tokens = int(max_num_batched_tokens or max(self.max_model_len, 8192))
        block_size, max_num_seqs = int(block_size), int(max_num_seqs)
        self.max_num_seqs = max_num_seqs
        weight = model.layers[0].attn.qkv_proj.weight if len(model.layers) else model.embed_tokens.weight
        self.device, dtype = weight.device, weight.dtype
        attn = model.layers[0].attn if len(model.layers) else None
        self.shape = CacheShape(num_layers=config.num_layers, num_kv_heads=attn.num_kv_heads if attn else 0,
                                head_dim=config.head_dim, block_size=block_size, dtype=dtype)
        self._group = attn.num_heads // attn.num_kv_heads if attn else 1  # query heads per kv head
        self.kv_cache_bytes = None if kv_cache_bytes is None else int(kv_cache_bytes)
        self.kv_cache_fraction = float(kv_cache_fraction)
        self.max_blocks_per_seq = math.ceil(self.max_model_len / block_size)
        self.cache: PagedKVCache | None = None
        self._decode_forward = DecodeForward(model, self.max_model_len)
        self._packed_head: PackedLinear | None = None
        # NCCL groups take CUDA tensors only; gloo takes host tensors
        self._comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")

    @classmethod
    def from_config(cls, model: CausalLM, rollout, tp_group: dist.ProcessGroup | None = None) -> "RolloutEngine":
        """An engine sized by ``hfrl.config.RolloutConfig`` (the ``rollout:`` section of a job's YAML)."""
        return cls(model, tp_group=tp_group, block_size=rollout.block_size, kv_cache_bytes=rollout.kv_cache_bytes,
                   kv_cache_fraction=rollout.kv_cache_fraction, max_num_seqs=rollout.max_num_seqs,
                   max_model_len=rollout.max_model_len, max_num_batched_tokens=rollout.max_num_batched_tokens)

    @staticmethod
    def sampling_params(rollout, num_prompts: int | None = None, step: int = 0,
                        **overrides) -> SamplingParams | list[SamplingParams]:
        """The ``SamplingParams`` of a ``RolloutConfig`` (``overrides`` win, e.g. stop_token_ids).

        With ``num_prompts``, a list with one per prompt of a rollout step: when ``rollout.seed`` is
        set each prompt gets its own seed (``spread_seeds(seed, num_prompts, salt=step)``), so no
        two prompts, and no two steps, share a random stream.
        """
        fields = dict(n=rollout.n, temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                      max_new_tokens=rollout.max_new_tokens, seed=rollout.seed)
        params = SamplingParams(**{**fields, **overrides})
        if num_prompts is None:
            return params
        if params.seed is None:
            return [params] * num_prompts
        return [dataclasses.replace(params, seed=seed) for seed in spread_seeds(params.seed, num_prompts, step)]

    # ---- cache -----------------------------------------------------------------------------------

    def _num_blocks(self) -> int:
        per_block = max(self.shape.bytes_per_block, 1)
        budget = self.kv_cache_bytes
        if budget is None:
            budget = int(free_device_bytes(self.device) * self.kv_cache_fraction)
        blocks = min(budget // per_block, self.max_num_seqs * self.max_blocks_per_seq)
        if self.tp > 1:  # every rank must schedule identically: the group's smallest cache
            count = torch.tensor([blocks], dtype=torch.int64, device=self._comm_device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.tp_group)
            blocks = int(count)
        return int(blocks)

    def _ensure_cache(self) -> PagedKVCache:
        if self.cache is None:
            blocks = self._num_blocks()
            if blocks < 1:
                raise ValueError(f"the KV cache budget ({self._budget_words()}) holds no block of "
                                 f"{self.shape.bytes_per_block} bytes ({self.shape.block_size} tokens); "
                                 "raise kv_cache_bytes / kv_cache_fraction or lower block_size")
            self.cache = PagedKVCache(self.shape, blocks, self.device,
                                      key_layout=key_layout_for(self.device, self.shape.dtype, self._group))
        return self.cache

    def release(self) -> None:
        """Free the KV cache (the hybrid engine calls this when generation ends)."""
        self.cache = None

    def _budget_words(self) -> str:
        if self.kv_cache_bytes is not None:
            return f"kv_cache_bytes={self.kv_cache_bytes}"
        return f"kv_cache_fraction={self.kv_cache_fraction} of free memory"

    # ---- input checks ----------------------------------------------------------------------------

    def _requests(self, prompts, params) -> list[tuple[torch.Tensor, SamplingParams]]:
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists (or 1-D tensors), got "
                             f"{type(prompts).__name__}{'' if not isinstance(prompts, Sequence) else ' of length 0'}")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
            raise ValueError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}")
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] is a {type(p).__name__}, not a SamplingParams")
            p = p.validate(self.vocab_size, where=f"params[{i}]")
            requests.append((self._prompt_tokens(i, prompt), p))
        return requests

    def _prompt_tokens(self, i: int, prompt) -> torch.Tensor:
        if isinstance(prompt, (str, bytes)):
            raise ValueError(f"prompts[{i}] is text; the engine takes token ids: tokenize it first")
        try:
            raw = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"prompts[{i}] is not a flat list of integer token ids ({err})") from None
        if raw.numel() == 0:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        if raw.dtype == torch.bool or raw.is_floating_point() or raw.is_complex() or raw.dim() != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D list of integer token ids, got {raw.dim()}-D {raw.dtype}")
        tokens = raw.to(torch.int64).cpu()
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"prompts[{i}] holds token id {low if low < 0 else high} outside the "
                             f"vocabulary [0, {self.vocab_size})")
        if tokens.numel() >= self.max_model_len:
            raise ValueError(f"prompts[{i}] has {tokens.numel()} tokens; the context is max_model_len="
                             f"{self.max_model_len} tokens and must hold the prompt plus at least one "
                             "generated token: shorten the prompt")
        return tokens

    def _check_fits(self, cache: PagedKVCache, requests) -> None:
        """A clear error when even one sequence alone cannot fit in the cache (nothing to preempt for)."""
        bs = cache.block_size
        for i, (tokens, p) in enumerate(requests):
            longest = min(tokens.numel() + p.max_new_tokens, self.max_model_len) - 1  # last token never cached
            need = math.ceil(longest / bs)
            if need > cache.num_blocks:
                raise ValueError(
                    f"prompts[{i}]: one sequence of {tokens.numel()} prompt + {p.max_new_tokens} new tokens needs "
                    f"{need} KV blocks ({need * self.shape.bytes_per_block} bytes), but the KV cache budget "
                    f"({self._budget_words()}) holds {cache.num_blocks} blocks ({cache.nbytes} bytes): raise the "
                    "budget or lower max_new_tokens")

    def _check_same_on_tp(self, requests) -> None:
        """Every rank of the TP group must generate for the same prompts and parameters."""
        if self.tp == 1:
            return
        h = 0
        for tokens, p in requests:
            weights = torch.arange(1, tokens.numel() + 1, dtype=torch.int64)
            h = (h * 1000003 + int((tokens * weights).sum()) + tokens.numel()) % (1 << 61)
            h = (h * 1000003 + zlib.crc32(repr(p).encode())) % (1 << 61)  # p: validated, plain numbers
        both = torch.tensor([h, -h], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.tp_group)
        if int(both[0]) != h or int(both[1]) != -h:
            raise ValueError("the ranks of the generation TP group were given different prompts or sampling "
                             "params; every rank of a TP group must call generate with the same inputs")

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int] | torch.Tensor],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> RolloutOutput:
        requests = self._requests(prompts, params)
        self._check_same_on_tp(requests)
        cache = self._ensure_cache()
        self._check_fits(cache, requests)
        seeds = self._base_seeds(requests)
        try:
            # the head's weight in oneDNN's layout for this call (its values change between calls)
            self._packed_head = (PackedLinear.of(self.model.lm_head.weight)
                                 if getattr(self.model.lm_head, "local_logits", None) is None else None)
            out = _Run(self, cache, requests, seeds).run()
            if cache.num_free != cache.num_blocks:  # an invariant: a leak would shrink every later call
                raise RuntimeError(f"KV cache leak: {cache.num_blocks - cache.num_free} blocks still held after "
                                   "every sequence finished")
            return out
        finally:
            cache.reset()
            self._packed_head = None

    def _base_seeds(self, requests) -> list[int]:
        """Each request's seed; unseeded ones draw from torch's generator on the TP group's first rank."""
        seeds = torch.tensor([p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, ()))
                              for _, p in requests], dtype=torch.int64)
        if self.tp > 1 and any(p.seed is None for _, p in requests):
            seeds = seeds.to(self._comm_device)
            dist.broadcast(seeds, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return seeds.tolist()

    # ---- model calls (used by _Run) ---------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states -> (N, V) full-vocabulary fp32 logits on every TP rank.

        On CPU in fp32 the head is the weight packed for oneDNN at the start of ``generate``
        (``PackedLinear``); otherwise its matmul is W @ h^T, which on CPU (MKL, fp32) measured 1.3-3.4x
        faster than F.linear's h @ W^T for a 32000 x 256 head at 2..64 rows.
        Padded vocabulary rows of a vocab-parallel head are cut off below, so their -inf mask is moot.
        """
        # Reads lm_head.weight directly (hfrl's own CausalLM/VocabParallelLMHead: no bias, no hooks); a head
        # made of pieces (the hybrid engine's generation layout) computes its own local logits.
        head = self.model.lm_head
        local_logits = getattr(head, "local_logits", None)
        if local_logits is not None:
            logits = local_logits(hidden).contiguous()  # (N, V_local)
        elif self._packed_head is not None:
            logits = self._packed_head(hidden)  # (N, V_local)
        else:
            rows = hidden
            if hidden.shape[0] == 1 and hidden.device.type == "cpu":  # a 1-column product is MKL's GEMV, which
                rows = hidden.expand(2, -1)  # streamed the head at half the rate of a 2-column GEMM (measured)
            logits = torch.mm(head.weight, rows.t())[:, :hidden.shape[0]].t().contiguous()  # (N, V_local)
        if self.tp > 1:
            from hfrl.distributed.tensor_parallel import gather_vocab_logits

            logits = gather_vocab_logits(logits, self.tp_group, self.vocab_size)
        return logits[..., :self.vocab_size].float()

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens of the TP group's first rank, on every rank of the group."""
        if self.tp == 1:
            return tokens
        tokens = tokens.to(self._comm_device, copy=True).contiguous()  # the caller compares with its own
        dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return tokens


class _Run:
    """The state of one ``generate`` call: per-sample tables and the running batch, all tensors."""

    def __init__(self, engine: RolloutEngine, cache: PagedKVCache, requests, seeds: list[int]):
        self.engine, self.cache = engine, cache
        self.bs = cache.block_size
        counts = [p.n for _, p in requests]
        self.num_samples = total = sum(counts)
        self.prompt_of = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts))
        self.sample_index = torch.cat([torch.arange(n) for n in counts])
        ps = [p for _, p in requests for _ in range(p.n)]
        self.seed = torch.tensor(seeds, dtype=torch.int64)[self.prompt_of] + self.sample_index
        temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float64)
        self.temperature = torch.where(temperature < GREEDY_BELOW, 0.0, temperature)
        self.top_k = torch.tensor([p.top_k for p in ps], dtype=torch.int64)
        self.top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float64)
        # Device copies, indexed on the device each step (no per-step upload of the parameters).
        device = engine.device
        self.params_dev = tuple(t.to(device) for t in (self.temperature.float(), self.top_k, self.top_p.float(),
                                                        self.seed))
        lens = torch.tensor([tokens.numel() for tokens, _ in requests])[self.prompt_of]
        self.max_new = torch.minimum(torch.tensor([p.max_new_tokens for p in ps]), engine.max_model_len - lens)
        width = max((len(p.stop_token_ids) for p in ps), default=0)
        self.stop_ids = torch.full((total, max(width, 1)), -1, dtype=torch.int64)
        for row, p in enumerate(ps):
            if p.stop_token_ids:
                self.stop_ids[row, :len(p.stop_token_ids)] = torch.tensor(list(p.stop_token_ids))
        self.prompts = [tokens for tokens, _ in requests]
        self.out_tokens = torch.zeros(total, int(self.max_new.max()), dtype=torch.int64)
        self.out_log_probs = torch.zeros(total, int(self.max_new.max()))
        self.gen_len = torch.zeros(total, dtype=torch.int64)
        self.finish = torch.full((total,), -1, dtype=torch.int64)  # index into FINISH_REASONS
        # Running batch, one row per sequence in admission order.
        self.rid = torch.zeros(0, dtype=torch.int64)  # sample id
        self.ctx = torch.zeros(0, dtype=torch.int64)  # tokens in the cache
        self.nxt = torch.zeros(0, dtype=torch.int64)  # token to feed next (its K/V not cached yet)
        self.nblk = torch.zeros(0, dtype=torch.int64)
        self.tables = torch.zeros(0, engine.max_blocks_per_seq, dtype=torch.int64)
        self.waiting: deque[_Entry] = deque()
        first = 0
        for (tokens, p), n in zip(requests, counts):
            ids = list(range(first, first + n))
            first += n
            if n > 1 and (n > engine.max_num_seqs or self._prefill_blocks(tokens.numel(), n) > cache.num_blocks):
                self.waiting.extend(_Entry([i], tokens) for i in ids)  # too big to share: prefill each
            else:
                self.waiting.append(_Entry(ids, tokens))
        self.stats = dict(preemptions=0, prefill_steps=0, prefill_tokens=0, decode_steps=0, decode_tokens=0,
                          time_prefill_s=0.0, time_decode_s=0.0)

    @property
    def running(self) -> int:
        return self.rid.numel()

    def run(self) -> RolloutOutput:
        start = time.perf_counter()
        while self.waiting or self.running:
            admitted = self._admit()
            if admitted:
                t0 = time.perf_counter()
                self._prefill(admitted)
                self.stats["time_prefill_s"] += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                self._decode()
                self.stats["time_decode_s"] += time.perf_counter() - t0
        return self._output(time.perf_counter() - start)

    # ---- scheduling --------------------------------------------------------------------------------

    def _admit(self) -> list[_Entry]:
        admitted, seqs, free, tokens = [], self.running, self.cache.num_free, 0
        while self.waiting:
            entry = self.waiting[0]
            n, length = len(entry.samples), entry.tokens.numel()
            need = self._prefill_blocks(length, n)
            if seqs + n > self.engine.max_num_seqs:
                break
            if admitted and tokens + length > self.engine.max_num_batched_tokens:
                break
            reserve = seqs + n if seqs else 0  # one block of headroom per running sequence (none if idle)
            if need + reserve > free:
                break
            admitted.append(self.waiting.popleft())
            seqs, free, tokens = seqs + n, free - need, tokens + length
        return admitted

    def _prefill_blocks(self, length: int, n: int) -> int:
        """Blocks to prefill a ``length``-token prompt for ``n`` samples: its blocks, plus a copy of
        the partial last block for every sample after the first."""
        return math.ceil(length / self.bs) + (n - 1) * (length % self.bs != 0)

    def _held_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """Every block the running ``rows`` point at (with repeats: shared blocks once per row)."""
        tables = self.tables[rows]
        return tables[torch.arange(tables.shape[1])[None] < self.nblk[rows][:, None]]

    def _preempt(self, count: int) -> None:
        """Free the last ``count`` rows (latest admitted); they wait at the queue's front for recompute."""
        keep = self.running - count
        entries = []
        for row in range(keep, self.running):
            sid = int(self.rid[row])
            generated = self.out_tokens[sid, :int(self.gen_len[sid])]
            entries.append(_Entry([sid], torch.cat([self.prompts[int(self.prompt_of[sid])], generated])))
        self.cache.release(self._held_blocks(torch.arange(keep, self.running)))
        self.waiting.extendleft(reversed(entries))
        self._keep(torch.arange(keep))
        self.stats["preemptions"] += count

    def _keep(self, rows: torch.Tensor) -> None:
        self.rid, self.ctx, self.nxt, self.nblk = (t[rows] for t in (self.rid, self.ctx, self.nxt, self.nblk))
        self.tables = self.tables[rows]

    # ---- steps ---------------------------------------------------------------------------------------

    def _prefill(self, entries: list[_Entry]) -> None:
        engine, bs = self.engine, self.bs
        lengths = torch.tensor([e.tokens.numel() for e in entries])
        nblocks = (lengths + bs - 1) // bs
        blocks = self.cache.allocate(int(nblocks.sum()))
        block_start = torch.cumsum(nblocks, 0) - nblocks  # first block of each entry in ``blocks``
        entry_of = torch.repeat_interleave(torch.arange(len(entries)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        offset = torch.arange(int(lengths.sum())) - starts[entry_of]  # position within its sequence
        slots = blocks[block_start[entry_of] + offset // bs] * bs + offset % bs
        ends = torch.cumsum(lengths, 0)
        spans = list(zip(starts.tolist(), ends.tolist()))
        device = engine.device
        tokens = torch.cat([e.tokens for e in entries])
        backend = PrefillAttention(self.cache, slots.to(device), spans)
        hidden = engine.model(tokens[None].to(device), position_ids=offset[None].to(device), attention=backend,
                              return_hidden=True)[0]  # (T, H)
        logits = engine._logits(hidden[(ends - 1).to(device)])  # (E, V)
        counts = torch.tensor([len(e.samples) for e in entries])
        sids = torch.tensor([s for e in entries for s in e.samples], dtype=torch.int64)
        logits = logits.repeat_interleave(counts.to(logits.device), dim=0)  # one row per sample
        self._sample_and_record(logits, sids)
        # Running rows: each sample points at its entry's blocks; the partial last block is copied.
        rows_entry = torch.repeat_interleave(torch.arange(len(entries)), counts)
        width = engine.max_blocks_per_seq
        tables = torch.zeros(sids.numel(), width, dtype=torch.int64)
        col = torch.arange(width)
        within = col[None] < nblocks[rows_entry][:, None]
        tables[within] = blocks[(block_start[rows_entry][:, None] + col[None])[within]]
        first = torch.cumsum(counts, 0) - counts
        later = torch.arange(sids.numel()) != first[rows_entry]  # samples 2..n of each entry
        partial = later & (lengths[rows_entry] % bs != 0)
        if bool(later.any()):  # samples 2..n hold one more reference to every full prompt block
            full_cols = col[None] < (lengths[rows_entry] // bs)[:, None]
            self.cache.share(tables[later[:, None] & full_cols], 1)
        if bool(partial.any()):
            rows = partial.nonzero().squeeze(1)
            last_col = nblocks[rows_entry[rows]] - 1
            copies = self.cache.allocate(rows.numel())
            self.cache.copy_blocks(tables[rows, last_col], copies)
            tables[rows, last_col] = copies
        self.rid = torch.cat([self.rid, sids])
        self.ctx = torch.cat([self.ctx, lengths[rows_entry]])
        self.nxt = torch.cat([self.nxt, self.out_tokens[sids, self.gen_len[sids] - 1]])
        self.nblk = torch.cat([self.nblk, nblocks[rows_entry]])
        self.tables = torch.cat([self.tables, tables])
        self.stats["prefill_steps"] += 1
        self.stats["prefill_tokens"] += int(lengths.sum())
        self._retire()

    def _decode(self) -> None:
        engine, bs = self.engine, self.bs
        while True:  # preempt the latest admitted rows until every row's next block can be had
            pos = self.ctx
            need = pos % bs == 0  # the token fed now starts a new block
            count = int(need.sum())
            if count <= self.cache.num_free:
                break
            self._preempt(1)
            if not self.running:
                return
        rows = need.nonzero().squeeze(1)
        if count:
            self.tables[rows, pos[rows] // bs] = self.cache.allocate(count)
            self.nblk[rows] += 1
        running = torch.arange(self.running)
        slots = self.tables[running, pos // bs] * bs + pos % bs
        device = engine.device
        width = int(self.nblk.max())
        backend = DecodeAttention(self.cache, slots.to(device), self.tables[:, :width].to(device, torch.int32),
                                  (pos + 1).to(device, torch.int32))
        hidden = engine._decode_forward(self.nxt.to(device), pos.to(device), backend)  # (R, H)
        self.ctx = pos + 1
        self._sample_and_record(engine._logits(hidden), self.rid)
        self.nxt = self.out_tokens[self.rid, self.gen_len[self.rid] - 1]
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += self.running
        self._retire()

    def _sample_and_record(self, logits: torch.Tensor, sids: torch.Tensor) -> None:
        steps = self.gen_len[sids]
        flags = SamplingFlags.of(self.temperature[sids], self.top_k[sids], self.top_p[sids], logits.shape[-1])
        index = sids.to(logits.device)
        temperature, top_k, top_p, seeds = (t.index_select(0, index) for t in self.params_dev)
        tokens, log_probs = sample(logits, temperature, top_k, top_p, seeds, steps.to(logits.device), flags)
        agreed = self.engine._agree(tokens)
        if agreed is not tokens and not torch.equal(agreed, tokens):  # never expected: a safety net
            log_probs = token_log_probs(logits, temperature, agreed)
        self.out_tokens[sids, steps] = agreed.cpu()
        self.out_log_probs[sids, steps] = log_probs.float().cpu()
        self.gen_len[sids] = steps + 1

    def _retire(self) -> None:
        """Finish rows whose last token is a stop token or that reached max_new_tokens; free their blocks."""
        sids = self.rid
        last = self.out_tokens[sids, self.gen_len[sids] - 1]
        stopped = (last[:, None] == self.stop_ids[sids]).any(dim=1)
        full = self.gen_len[sids] >= self.max_new[sids]
        done = stopped | full
        if not bool(done.any()):
            return
        rows = done.nonzero().squeeze(1)
        self.finish[sids[rows]] = torch.where(stopped[rows], 0, 1)
        self.cache.release(self._held_blocks(rows))
        self._keep((~done).nonzero().squeeze(1))

    def _output(self, elapsed: float) -> RolloutOutput:
        samples = []
        for sid in range(self.num_samples):
            n = int(self.gen_len[sid])
            samples.append(Sample(prompt_index=int(self.prompt_of[sid]), index=int(self.sample_index[sid]),
                                  token_ids=self.out_tokens[sid, :n].tolist(),
                                  log_probs=self.out_log_probs[sid, :n].clone(),
                                  finish_reason=FINISH_REASONS[int(self.finish[sid])]))
        generated = int(self.gen_len.sum())
        cache = self.cache
        stats = dict(self.stats, num_samples=self.num_samples, generated_tokens=generated,
                     kv_blocks=cache.num_blocks, kv_block_size=cache.block_size,
                     kv_cache_bytes=cache.nbytes, kv_peak_blocks_used=cache.peak_used,
                     kv_peak_bytes=cache.peak_used * cache.shape.bytes_per_block,
                     time_s=elapsed, tokens_per_s=generated / elapsed if elapsed > 0 else 0.0)
        return RolloutOutput(samples, stats)
