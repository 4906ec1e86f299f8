"""Sampling parameters and the batched sampler of the rollout engine.

Every decode step samples one token for each running sequence from its logits row, with that
sequence's own parameters (temperature, top-k, top-p), in a handful of batched tensor ops: no loop
over sequences. Randomness is counter-based: the uniform number behind sample ``s`` of a request
at response position ``t`` is a hash of (seed + s, t), so a seeded response does not depend on what
else was in the batch, on preemption, or on the rank that computes it.

Log-probs are those of the *unfiltered* distribution at the sampling temperature,
``log_softmax(logits / temperature)`` (raw logits, i.e. temperature 1, for greedy), which is what
``TrainEngine.compute_log_probs(batch, temperature)`` computes for the same tokens: the ratio in
a PPO loss is then exactly 1 on the first update.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from hfrl_kernels import native

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping multiplication; logical shifts via masks)."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_from_counters(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in [0, 1) per (seed, step) pair: a pure function of the pair, on any device."""
    x = _splitmix64(_splitmix64(seeds.long()) ^ steps.long())
    return ((x >> 11) & ((1 << 53) - 1)).double() * (1.0 / (1 << 53))


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (vLLM's rule): logits / 1e-38 would overflow to inf."""


def as_int(value) -> int | None:
    """``value`` as a Python int if it is an integer (numpy and 0-d tensors too), never a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if isinstance(value, torch.Tensor):
        return int(value) if value.dim() == 0 and not value.is_floating_point() else None
    return int(value) if isinstance(value, numbers.Integral) else None


def as_real(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


@dataclass
class SamplingParams:
    """How to sample the responses to one prompt (vLLM's names and meanings).

    temperature 0 (or below 1e-5) is greedy decoding. top-k keeps the k most likely tokens (ties at
    the k-th value kept), then top-p keeps the smallest prefix of those, renormalised, whose mass
    reaches p (HF's TopK then TopP warpers). ``seed``: sample ``s`` of ``n`` uses seed ``seed + s``,
    so ``SamplingParams(n=4, seed=7)`` gives the same responses as four requests with ``n=1`` and
    seeds 7, 8, 9, 10; two requests with one seed draw the same random numbers, so give prompts
    seeds far apart (``spread_seeds``). None draws a seed from torch's global generator
    (``torch.manual_seed`` fixes it). The stop token is part of the response (an RL policy must
    learn to emit it).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None

    def validate(self, vocab_size: int, where: str = "SamplingParams") -> "SamplingParams":
        """A checked copy with plain Python numbers; ValueError naming the field otherwise."""
        def bad(name, value, need):
            raise ValueError(f"{where}.{name}={value!r}: {need}")

        n, top_k, max_new = as_int(self.n), as_int(self.top_k), as_int(self.max_new_tokens)
        temperature, top_p = as_real(self.temperature), as_real(self.top_p)
        if n is None or n < 1:
            bad("n", self.n, "must be a positive integer number of responses per prompt")
        if temperature is None or not 0 <= temperature < math.inf:
            bad("temperature", self.temperature, "must be a finite number >= 0 (0: greedy)")
        if top_k is None or not (top_k == -1 or top_k >= 1):
            bad("top_k", self.top_k, "must be -1 (disabled) or a positive integer")
        if top_p is None or not 0 < top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]; 1 disables nucleus sampling")
        if max_new is None or max_new < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be a positive integer number of tokens")
        stops = self.stop_token_ids
        if isinstance(stops, torch.Tensor):
            stops = stops.reshape(-1).tolist() if not stops.is_floating_point() else None
        if stops is None or isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids (e.g. [eos_id])")
        stops = [as_int(t) for t in stops]
        if any(t is None or not 0 <= t < vocab_size for t in stops):
            bad("stop_token_ids", list(self.stop_token_ids), f"must be integer token ids in [0, {vocab_size})")
        seed = None if self.seed is None else as_int(self.seed)
        if self.seed is not None and (seed is None or not 0 <= seed < 2 ** 62):
            bad("seed", self.seed, "must be None or an integer in [0, 2**62)")
        return SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new,
                              stop_token_ids=tuple(stops), seed=seed)


def spread_seeds(seed: int, count: int, salt: int = 0) -> list[int]:
    """``count`` seeds in [0, 2**62) derived from (seed, salt, i): per-prompt seeds of one rollout
    step (salt = the step), far apart so the samples of different prompts never share a stream."""
    index = torch.arange(count, dtype=torch.int64)
    mixed = _splitmix64(_splitmix64(_splitmix64(torch.full_like(index, seed)) ^ salt) ^ index)
    return ((mixed >> 2) & ((1 << 62) - 1)).tolist()


def uses_top_k(top_k: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Rows whose top-k filters something (0 < k < vocabulary)."""
    return (top_k > 0) & (top_k < vocab_size)


@dataclass(frozen=True)
class SamplingFlags:
    """What a batch of rows needs, decided on the host so a GPU step does not synchronise for it."""

    all_greedy: bool
    any_greedy: bool
    any_scaled: bool  # some sampled row has temperature != 1
    max_top_k: int  # 0: no row uses top-k
    any_top_p: bool

    @classmethod
    def of(cls, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, vocab_size: int):
        greedy = temperature < GREEDY_BELOW
        if bool(greedy.all()):  # nothing sampled: the rest follows (and a step saves ten host ops)
            return cls(all_greedy=True, any_greedy=True, any_scaled=False, max_top_k=0, any_top_p=False)
        sampled = ~greedy
        use_k = sampled & uses_top_k(top_k, vocab_size)
        return cls(all_greedy=False, any_greedy=bool(greedy.any()),
                   any_scaled=bool((sampled & (temperature != 1)).any()),
                   max_top_k=int(top_k[use_k].max()) if bool(use_k.any()) else 0,
                   any_top_p=bool((sampled & (top_p < 1)).any()))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor, any_scaled: bool | None = None) -> torch.Tensor:
    """logits / temperature per row as a new fp32 tensor; greedy rows keep the raw logits."""
    logits = logits.float()
    if any_scaled is None:
        any_scaled = bool(((temperature >= GREEDY_BELOW) & (temperature != 1)).any())
    if not any_scaled:
        return logits.contiguous()
    scale = torch.where(temperature >= GREEDY_BELOW, temperature, torch.ones_like(temperature))
    return logits / scale.clamp(max=1e30).to(logits.dtype)[:, None]


def token_log_probs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) (N,) fp32 under ``logits / temperature`` (raw logits where temperature is 0)."""
    scaled = _scaled(logits, temperature)
    return torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, flags: SamplingFlags | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. logits (N, V) -> tokens (N,) int64, log-probs (N,) fp32.

    temperature/top_p (N,) float, top_k (N,) int64 (-1: off), seeds/steps (N,) int64. Rows with
    temperature below 1e-5 take the argmax. Sampling is inverse-CDF over the vocabulary in id order
    with one counter-based uniform per row, so a row's token depends only on its own logits and
    parameters. ``flags`` (``SamplingFlags.of`` the host copies) saves a GPU the syncs to find them.
    """
    if flags is None:
        flags = SamplingFlags.of(temperature, top_k, top_p, logits.shape[-1])
    if native.takes_rows(logits):
        return _sample_compiled(logits, temperature, top_k, top_p, seeds, steps, flags)
    return _sample_torch(logits, temperature, top_k, top_p, seeds, steps, flags)


def _sample_compiled(logits, temperature, top_k, top_p, seeds, steps, flags: SamplingFlags):
    """``sample`` on the CPU in fp32 with the compiled kernels, each row by its own kind whatever else
    is in the batch (so a row's result does not depend on its neighbours): greedy rows by
    ``native.greedy`` (argmax and log-prob in one pass), rows sampled without top-k/top-p by
    ``native.sample`` (the same inverse CDF with the same counter-based uniform, without the
    (N, V) intermediates), rows with top-k/top-p by the PyTorch sampler. The compiled draw sums in
    another order than torch's cumsum, so a uniform that falls within rounding of a token boundary
    can pick the neighbouring token on the other path."""
    if flags.all_greedy:
        return native.greedy(logits)
    if not (flags.any_greedy or flags.max_top_k or flags.any_top_p):  # every row plain
        return native.sample(logits, temperature, uniform_from_counters(seeds, steps))
    vocab = logits.shape[-1]
    greedy = temperature < GREEDY_BELOW
    filtered = ~greedy & (uses_top_k(top_k, vocab) | (top_p < 1))
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    log_probs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for kind, mask in (("greedy", greedy), ("plain", ~greedy & ~filtered), ("filtered", filtered)):
        rows = mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        part = logits.index_select(0, rows)
        t, k, p, s, n = (x.index_select(0, rows) for x in (temperature, top_k, top_p, seeds, steps))
        if kind == "greedy":
            got = native.greedy(part)
        elif kind == "plain":
            got = native.sample(part, t, uniform_from_counters(s, n))
        else:
            got = _sample_torch(part, t, k, p, s, n, SamplingFlags.of(t, k, p, vocab))
        tokens[rows], log_probs[rows] = got
    return tokens, log_probs


def _sample_torch(logits, temperature, top_k, top_p, seeds, steps, flags: SamplingFlags):
    """``sample`` in PyTorch ops (any device and dtype)."""
    scaled = _scaled(logits, temperature, flags.any_scaled)  # (N, V), contiguous
    # log_softmax, not x - logsumexp(x): on CPU it measured 2x faster than logsumexp alone (48 x 32000)
    log_probs = torch.log_softmax(scaled, dim=-1)  # (N, V)
    if flags.all_greedy:
        tokens = argmax_rows(scaled)
    else:
        rows = (temperature >= GREEDY_BELOW).nonzero().squeeze(1) if flags.any_greedy else None
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        probs = pick(log_probs).exp()
        if flags.max_top_k or flags.any_top_p:
            probs = _filter(probs, pick(top_k), pick(top_p), flags.max_top_k, flags.any_top_p)
        drawn = _inverse_cdf(probs, pick(seeds), pick(steps))
        tokens = drawn if rows is None else argmax_rows(scaled).index_copy_(0, rows, drawn)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of (N, V) as int64, the first maximum on ties. On the host through numpy,
    whose argmax is vectorised: torch's CPU argmax measured 11x slower at 48 x 32000 (1.87 vs 0.16 ms)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        try:
            return torch.from_numpy(np.asarray(x.contiguous().numpy().argmax(axis=-1))).to(torch.int64)
        except RuntimeError:  # torch without numpy support
            pass
    return x.argmax(dim=-1)


def _inverse_cdf(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of (M, V) unnormalised probabilities, by a counter-based uniform."""
    cdf = probs.cumsum(dim=-1)  # (M, V); a filtered (zero) entry repeats its left neighbour's value
    # a uniform within 2^-25 of 1 would round to 1.0 in float32 and draw past the last kept token (a
    # filtered one after the clamp): keep it two float32 ulps below 1
    u = uniform_from_counters(seeds, steps).to(cdf.dtype).clamp_(max=1 - 2 ** -23) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[-1] - 1)  # u < total: only rounding can reach past the end


def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int,
            any_top_p: bool) -> torch.Tensor:
    """Zero the entries outside each row's top-k set (ties at the k-th value kept), then outside the
    smallest prefix of the rest whose renormalised mass reaches top_p (HF's TopK then TopP)."""
    vocab = probs.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if not any_top_p:  # top-k only: the k-th largest value is the threshold, no full sort
        kth = probs.topk(max_top_k, dim=-1).values.gather(1, (k.clamp(max=max_top_k) - 1)[:, None])
        kth = torch.where(k[:, None] < vocab, kth, torch.zeros_like(kth))  # rows without top-k keep all
        return probs.masked_fill(probs < kth, 0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    kth = sorted_probs.gather(1, (k - 1)[:, None])
    sorted_probs = sorted_probs.masked_fill(sorted_probs < kth, 0.0)
    # nucleus: keep a token while the kept mass before it is below top_p (the first always stays)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    mass = sorted_probs.sum(dim=-1, keepdim=True)
    sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None].to(before.dtype) * mass, 0.0)
    return torch.empty_like(probs).scatter_(1, order, sorted_probs)
