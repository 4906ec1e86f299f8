"""Sampling parameters and the batched sampler of the rollout engine.

Every decode step samples one token for each running sequence from its logits row, with that
sequence's own parameters (temperature, top-k, top-p), in a handful of batched tensor ops: no loop
over sequences. Randomness is counter-based: the uniform number behind sample ``s`` of a request
at response position ``t`` is a hash of (seed + s, t), so a seeded response does not depend on what
else was in the batch, on preemption, or on the rank that computes it.

Log-probs are those of the *unfiltered* distribution at the sampling temperature,
``log_softmax(logits / temperature)`` (raw logits for greedy), which is what
``TrainEngine.compute_log_probs(batch, temperature)`` computes for the same tokens: the ratio in
a PPO loss is then exactly 1 on the first update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

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


@dataclass
class SamplingParams:
    """How to sample the responses to one prompt (vLLM's names and meanings).

    temperature 0 is greedy decoding. ``seed``: sample ``s`` of ``n`` uses seed ``seed + s``, so
    ``SamplingParams(n=4, seed=7)`` gives the same responses as four requests with ``n=1`` and seeds
    7, 8, 9, 10; None draws a seed from torch's global generator (``torch.manual_seed`` fixes it).
    The stop token is part of the response (an RL policy must learn to emit it).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None

    def validate(self, vocab_size: int, where: str = "SamplingParams") -> None:
        def bad(name, value, need):
            raise ValueError(f"{where}.{name}={value!r}: {need}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", self.n, "must be a positive number of responses per prompt")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            bad("temperature", self.temperature, "must be a finite number >= 0 (0: greedy)")
        if not isinstance(self.top_k, int) or not (self.top_k == -1 or self.top_k >= 1):
            bad("top_k", self.top_k, "must be -1 (disabled) or a positive integer")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be in (0, 1]; 1 disables nucleus sampling")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be a positive number of tokens")
        for token in self.stop_token_ids:
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                bad("stop_token_ids", list(self.stop_token_ids), f"must be token ids in [0, {vocab_size})")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 62):
            bad("seed", self.seed, "must be None or an integer in [0, 2**62)")


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature per row, fp32; greedy rows (temperature 0) keep the raw logits."""
    logits = logits.float()
    if not bool(((temperature > 0) & (temperature != 1)).any()):  # greedy / T = 1 rows: no division
        return logits
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.dtype)
    return logits / scale[:, None]


def token_log_probs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) (N,) fp32 under ``logits / temperature`` (raw logits where temperature is 0)."""
    return _picked_log_probs(_scaled(logits, temperature), tokens)


def _picked_log_probs(scaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # logit - logsumexp: one read of the row, no (N, V) log-softmax written out
    return scaled.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. logits (N, V) -> tokens (N,) int64, log-probs (N,) fp32.

    temperature/top_p (N,) float, top_k (N,) int64 (-1: off), seeds/steps (N,) int64. Rows with
    temperature 0 take the argmax. Sampling is inverse-CDF over the vocabulary in id order with one
    counter-based uniform per row, so a row's token depends only on its own logits and parameters.
    """
    greedy = temperature <= 0
    scaled = _scaled(logits, temperature)  # (N, V)
    if bool(greedy.all()):
        tokens = scaled.argmax(dim=-1)
    else:
        rows = None if not bool(greedy.any()) else (~greedy).nonzero().squeeze(1)
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        probs = torch.softmax(pick(scaled), dim=-1)
        drawn = _sample_rows(probs, pick(top_k), pick(top_p), pick(seeds), pick(steps))
        tokens = drawn if rows is None else scaled.argmax(dim=-1).index_copy_(0, rows, drawn)
    return tokens, _picked_log_probs(scaled, tokens)


def _sample_rows(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
                 steps: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of (M, V) probabilities after per-row top-k / top-p filtering."""
    vocab = probs.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1
    if bool(use_k.any()) or bool(use_p.any()):
        probs = _filter(probs, torch.where(use_k, top_k, vocab), top_p, bool(use_p.any()))
    cdf = probs.double().cumsum(dim=-1)  # (M, V); float64 so a 1e5-token vocabulary sums cleanly
    u = uniform_from_counters(seeds, steps) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    # u < total, so the index is valid; a filtered (zero) entry can never be chosen (its cdf step is 0)
    return tokens.clamp_(max=vocab - 1)


def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, any_p: bool) -> torch.Tensor:
    """Zero the entries outside each row's top-k and top-p set (ties at the threshold are kept)."""
    if not any_p:  # top-k only: the k-th largest value is the threshold, no full sort
        kmax = int(top_k.max())
        kth = probs.topk(kmax, dim=-1).values.gather(1, (top_k - 1)[:, None])  # (M, 1)
        return probs.masked_fill(probs < kth, 0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep = rank[None, :] < top_k[:, None]
    # nucleus: keep a token while the mass before it is below top_p (the first token always stays)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= before < top_p[:, None].to(before.dtype) * sorted_probs.sum(dim=-1, keepdim=True)
    sorted_probs = sorted_probs * keep
    return torch.empty_like(probs).scatter_(1, order, sorted_probs)
