"""The batched sampler: its distribution, its filters, its independence from the batch; the block allocator."""
import pytest
import torch

from hfrl.rollout.kv_cache import CacheShape, PagedKVCache
from hfrl.rollout.sampling import (SamplingFlags, _filter, _sample_torch, sample, token_log_probs,
                                   uniform_from_counters)
from hfrl_kernels import native


def test_counter_uniforms_are_uniform_and_pure():
    seeds = torch.arange(200).repeat_interleave(500)
    steps = torch.arange(500).repeat(200)
    u = uniform_from_counters(seeds, steps)
    assert torch.equal(u, uniform_from_counters(seeds, steps))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)  # 100000 draws, 10000 expected per bin
    assert float((counts - 10000).abs().max()) < 400  # ~4 sigma
    assert u.unique().numel() == u.numel()


def _hf_kept(logits, top_k, top_p):
    """Which tokens transformers' TopK then TopP warpers keep, one row at a time."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    kept = []
    for row, k, p in zip(logits, top_k.tolist(), top_p.tolist()):
        scores = row[None].clone()
        if 0 < k < row.numel():
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        kept.append(scores[0] > float("-inf"))
    return torch.stack(kept)


def test_top_k_then_top_p_keeps_what_transformers_keeps():
    torch.manual_seed(0)
    logits = torch.randn(14, 50) * 2
    logits[12, :4] = logits[13, :4] = 5.0  # ties at the k-th value (kept, as HF keeps them)
    top_k = torch.tensor([-1, 1, 3, 10, -1, -1, 7, -1, 2, -1, 20, 5, 2, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.9, 0.8, 0.05, 0.99, 0.3, 1.0, 0.7, 1.0, 0.6],
                         dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    expected = _hf_kept(logits, top_k, top_p)
    assert torch.equal(_filter(probs, top_k, top_p, 20, True) > 0, expected)
    k_rows = top_p == 1  # the top-k-only path (no sort) on the rows without top-p
    assert torch.equal(_filter(probs[k_rows], top_k[k_rows], top_p[k_rows], 20, False) > 0, expected[k_rows])
    # [.3, .3, .2, .2], k=2, p=0.5: the nucleus is taken within the top-k mass (HF and vLLM)
    two = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    assert _filter(two, torch.tensor([2]), torch.tensor([0.5]), 2, True)[0].gt(0).sum() == 1


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (3, 1.0), (-1, 0.7)])
def test_sampled_frequencies_match_the_filtered_distribution(top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n, temperature = 20000, 0.8
    tokens, log_probs = sample(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
                               torch.full((n,), top_p, dtype=torch.float64), torch.full((n,), 7), torch.arange(n))
    probs = torch.softmax(logits / temperature, dim=-1)
    expected = probs * _hf_kept((logits / temperature)[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]
    expected = expected / expected.sum()
    freq = torch.bincount(tokens, minlength=8).float() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert bool(((freq - expected).abs() <= 5 * sigma + 1e-9).all()), (freq, expected)
    assert bool((freq[expected == 0] == 0).all())  # filtered tokens are never drawn
    torch.testing.assert_close(log_probs, torch.log_softmax(logits / temperature, -1)[tokens])  # unfiltered


def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(16, 100)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3] * 4)
    top_k = torch.tensor([-1, 5, -1, 20] * 4)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.8] * 4, dtype=torch.float64)
    seeds, steps = torch.arange(16) * 3, torch.arange(16) % 5
    tokens, log_probs = sample(logits, temperature, top_k, top_p, seeds, steps)
    for rows in ([3], [0, 5, 9], list(range(15, -1, -1))):
        index = torch.tensor(rows)
        sub = sample(logits[index], temperature[index], top_k[index], top_p[index], seeds[index], steps[index])
        assert torch.equal(sub[0], tokens[index]) and torch.equal(sub[1], log_probs[index])
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    torch.testing.assert_close(log_probs, token_log_probs(logits, temperature, tokens))


@pytest.mark.parametrize("key_layout", ["token", "dim"])
def test_block_allocator_counts_references(key_layout):
    cache = PagedKVCache(CacheShape(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2, dtype=torch.float32),
                         num_blocks=6, device=torch.device("cpu"), key_layout=key_layout)
    a = cache.allocate(3)
    cache.share(a[:2], 2)  # two more sequences point at the first two blocks
    assert cache.num_free == 3 and cache.refcount[a].tolist() == [3, 3, 1]
    cache.release(torch.cat([a, a[:2]]))  # one sequence ends, then a second
    assert cache.num_free == 4 and cache.refcount[a].tolist() == [1, 1, 0]
    b = cache.allocate(4)
    assert set(b.tolist()).isdisjoint(a[:2].tolist()) and a[2].item() in b.tolist()  # freed block reused
    assert cache.num_free == 0 and cache.peak_used == 6
    with pytest.raises(RuntimeError, match="2 blocks asked, 0 free"):
        cache.allocate(2)
    cache.k.normal_()
    cache.v.normal_()
    cache.copy_blocks(a[:1], b[:1])
    assert torch.equal(cache.k[:, b[0]], cache.k[:, a[0]]) and torch.equal(cache.v[:, b[0]], cache.v[:, a[0]])
    cache.release(a[:2])
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(a[:1])


def test_argmax_rows_equals_torch_argmax_with_ties():
    from hfrl.rollout.sampling import argmax_rows

    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    x[2, [3, 30]] = 9.0  # a tie: the first index wins, as torch's argmax gives it
    x[4] = -1.0  # all equal
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x).tolist()[2] == 3 and argmax_rows(x).tolist()[4] == 0
    assert torch.equal(argmax_rows(x.double()), x.argmax(dim=-1))
    assert argmax_rows(x).dtype == torch.int64
    assert argmax_rows(torch.tensor([1.0, 3.0, 2.0])).item() == 1  # a single row, as torch.argmax


@pytest.mark.parametrize("key_layout", ["token", "dim"])
def test_cache_write_stores_each_token_at_its_slot(key_layout):
    """``write`` puts token t's keys and values at block slots[t] // block_size, offset slots[t] %
    block_size of the logical (layers, blocks, block_size, kv heads, head_dim) view, touching nothing else."""
    shape = CacheShape(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    cache = PagedKVCache(shape, num_blocks=5, device=torch.device("cpu"), key_layout=key_layout)
    assert (cache.k.is_contiguous(), cache.v.is_contiguous()) == (key_layout == "token", True)
    cache.k.zero_()
    cache.v.zero_()
    slots = torch.tensor([0, 7, 13, 18])  # blocks 0, 1, 3, 4
    k, v = torch.randn(4, 3, 8)[:, 1:], torch.randn(4, 2, 8)  # k a strided slice, as the decode step's is
    cache.write(1, cache.locate(slots), k, v)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(cache.k[1, slot // 4, slot % 4], k[t]) and torch.equal(cache.v[1, slot // 4, slot % 4], v[t])
    assert int((cache.k != 0).sum()) == int((cache.v != 0).sum()) == k.numel()  # layer 0 and other slots untouched



def test_each_row_kind_is_sampled_alike_alone_or_in_any_batch():
    """Greedy, plain-temperature and top-k/top-p rows mixed (on the CPU in fp32 the compiled kernels
    take the first two kinds, PyTorch the third): every row gives the same token and log-prob alone,
    in a sub-batch, reversed, or among rows of one kind only."""
    torch.manual_seed(2)
    logits = torch.randn(12, 3000) * 2
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 2.0, 0.0] * 2)
    top_k = torch.tensor([-1, -1, -1, 50, -1, -1] * 2)
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.9] * 2, dtype=torch.float64)
    seeds, steps = torch.arange(12) * 7 + 1, torch.arange(12) % 3
    tokens, log_probs = sample(logits, temperature, top_k, top_p, seeds, steps)
    for rows in ([1], [2, 4, 8], [0, 6], list(range(11, -1, -1)), [1, 2, 4, 7, 8, 10]):
        index = torch.tensor(rows)
        sub = sample(logits[index], temperature[index], top_k[index], top_p[index], seeds[index], steps[index])
        assert torch.equal(sub[0], tokens[index]) and torch.equal(sub[1], log_probs[index]), rows
    torch.testing.assert_close(log_probs, token_log_probs(logits, temperature, tokens), atol=2e-6, rtol=0)
    assert len(set(tokens[[1, 7]].tolist())) == 2  # the same logits row index pattern, different seeds
    # each kind against its own sampler called directly on just those rows
    greedy, filtered = temperature == 0, (top_k > 0) | (top_p < 1)
    plain = ~greedy & ~filtered
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    if native.available():
        drawn, _ = native.sample(logits[plain], temperature[plain], uniform_from_counters(seeds[plain], steps[plain]))
        assert torch.equal(tokens[plain], drawn)
    f = filtered & ~greedy
    expected, _ = _sample_torch(logits[f], temperature[f], top_k[f], top_p[f], seeds[f], steps[f],
                                SamplingFlags.of(temperature[f], top_k[f], top_p[f], 3000))
    assert torch.equal(tokens[f], expected)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_compiled_sampler_is_the_inverse_cdf():
    """native.sample with evenly spaced uniforms draws each token within one of n * p times (the
    inverse CDF exactly), agrees with the PyTorch inverse CDF on the same uniforms, returns the
    log-softmax value at the temperature, and gives a NaN row's first NaN."""
    from hfrl.rollout.sampling import _inverse_cdf

    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 1000, generator=gen) * 3
    n = 20000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens, log_probs = native.sample(row.expand(n, -1).contiguous(), torch.full((n,), 1.3), uniforms)
    p = torch.softmax(row[0].double() / 1.3, -1)
    counts = torch.bincount(tokens, minlength=1000).double()
    assert float((counts - n * p).abs().max()) <= 1.0 + 1e-6
    torch.testing.assert_close(log_probs.double(), torch.log_softmax(row[0].double() / 1.3, -1)[tokens],
                               atol=1e-6, rtol=1e-6)  # float32 rounding of x / T - max
    # against the exact (float64) inverse CDF: a token may differ only where the uniform lies within
    # float rounding of the boundary between the two tokens (the PyTorch path's cumsum is not exact either)
    logits = torch.randn(256, 33001, generator=gen) * 4
    temperature = torch.rand(256, generator=gen) + 0.5
    uniforms = uniform_from_counters(torch.arange(256), torch.zeros(256, dtype=torch.int64))
    tokens, _ = native.sample(logits, temperature, uniforms)
    cdf = torch.softmax(logits.double() / temperature[:, None].double(), -1).cumsum(-1)
    exact = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    for row in (tokens != exact).nonzero().squeeze(1).tolist():
        boundary = cdf[row, min(int(tokens[row]), int(exact[row]))] / cdf[row, -1]
        assert abs(float(boundary) - float(uniforms[row])) < 1e-6, (row, int(tokens[row]), int(exact[row]))
    assert int((tokens != exact).sum()) <= 2
    odd = torch.randn(5, 600, generator=gen)
    odd[1, 300] = float("nan")
    odd[2] = float("-inf")
    odd[3, 7] = float("inf")
    odd[4, 100:] = float("-inf")  # a probability-0 tail is never drawn, even by u just below 1
    tokens, log_probs = native.sample(odd, torch.ones(5), torch.tensor([0.5, 0.5, 0.5, 0.5, 1 - 2 ** -53],
                                                                        dtype=torch.float64))
    assert tokens[1:].tolist() == [300, 0, 7, 99] and log_probs[1:4].isnan().all()
    assert not log_probs[0].isnan() and not log_probs[4].isnan()


def test_a_uniform_next_to_one_never_draws_a_filtered_token():
    """Seed 0 at step 17974134 gives a uniform that rounds to 1.0 in float32: the PyTorch inverse CDF
    drew past the last kept token (the vocabulary's last id, outside the top 5) before it kept the
    uniform two float32 ulps below 1."""
    u = uniform_from_counters(torch.tensor([0]), torch.tensor([17974134]))
    assert float(u.float()) == 1.0
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample(logits, torch.ones(3), torch.tensor([5, -1, 5]), torch.tensor([1.0, 0.5, 0.9], dtype=torch.float64),
                       torch.zeros(3, dtype=torch.int64), torch.full((3,), 17974134))
    for row in (0, 2):
        assert int(tokens[row]) in logits[row].topk(5).indices.tolist()
    probs = torch.softmax(logits[1], -1)
    order = probs.argsort(descending=True)
    nucleus = order[:int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist()
    assert int(tokens[1]) in nucleus  # top-p 0.5 keeps the smallest prefix reaching half the mass
