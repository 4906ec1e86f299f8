"""The rollout engine against transformers' generate, against itself under other schedules, and
against the training engine's log-probs."""
import math
import re

import pytest
import torch

from hfrl.engine.train_engine import EngineConfig, TrainEngine
from hfrl.models import weights
from hfrl.rollout import RolloutEngine, SamplingParams
from hfrl_kernels.decode_attention import key_layout_for
from tests.models._hf import build_hf

# Larger weights than HF's default init: random tiny models then produce varied, not repeated, tokens.
INIT = dict(initializer_range=0.3, max_position_embeddings=96)
PROMPTS = [[1, 5, 9, 3, 4], [7, 8], list(range(10, 23)), [3] * 8, [100, 2, 50]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, checkpoint folder)."""
    out = {}
    for case in ("llama_gqa_tied", "qwen2_bias", "mistral_window"):
        ref = build_hf(case, **INIT)
        path = tmp_path_factory.mktemp(case)
        ref.save_pretrained(path)
        out[case] = (ref, path)
    return out


def engine_for(path, **kwargs):
    return RolloutEngine(weights.from_pretrained(path).eval(), block_size=kwargs.pop("block_size", 4),
                         kv_cache_bytes=kwargs.pop("kv_cache_bytes", 1 << 22), **kwargs)


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_bias", "mistral_window"])
def test_greedy_equals_transformers_generate(saved, case):
    ref, path = saved[case]
    eos = ref.generation_config.eos_token_id  # generate stops there; the engine stops on the same id
    stops = [eos] if eos is not None else []
    engine = engine_for(path)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=stops))
    assert engine.cache.key_layout == key_layout_for(torch.device("cpu"), torch.float32, engine._group)  # "dim"
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert out.samples[i].token_ids == expected, (case, i)
        assert out.samples[i].finish_reason == ("stop" if expected[-1] == eos else "length")
    assert len({tuple(s.token_ids) for s in out.samples}) == len(PROMPTS)  # not a degenerate model


SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=20, stop_token_ids=[5, 17])


def _assert_same(a, b, atol=3e-5):
    """Same tokens and finish reasons; log-probs to float rounding. The GEMMs round differently at
    different batch sizes (1e-5 seen on either CPU path with this fixture's large logits), and the
    greedy and sampled rows' log-softmax are separate kernels, each within 1e-6 of float64."""
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert [s.finish_reason for s in a.samples] == [s.finish_reason for s in b.samples]
    for x, y in zip(a.samples, b.samples):
        torch.testing.assert_close(x.log_probs, y.log_probs, atol=atol, rtol=0)


def test_continuous_batching_equals_each_request_alone(saved):
    _, path = saved["qwen2_bias"]
    params = [SamplingParams(seed=10 + i, **SAMPLED) for i in range(len(PROMPTS))]
    params[1] = SamplingParams(temperature=0, max_new_tokens=13)  # greedy and sampled rows mixed
    engine = engine_for(path, max_num_seqs=2)  # 5 requests through 2 slots: admitted as others finish
    together = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], q).samples[0] for p, q in zip(PROMPTS, params)]
    _assert_same(together, type(together)(alone))
    reasons = {s.finish_reason for s in together.samples}
    assert reasons == {"stop", "length"}, reasons  # both ends exercised
    assert together.stats["prefill_steps"] > 1  # later requests really joined a running batch


@pytest.mark.parametrize("prompt_len", [8, 9])  # a whole number of blocks, and a partial last block
def test_prefix_shared_samples_equal_independent_requests(saved, prompt_len):
    _, path = saved["llama_gqa_tied"]
    prompt = list(range(3, 3 + prompt_len))
    engine = engine_for(path)
    shared = engine.generate([prompt], SamplingParams(n=6, seed=100, **SAMPLED))
    assert shared.stats["prefill_tokens"] == prompt_len  # the prompt was prefilled once
    independent = engine.generate([prompt] * 6, [SamplingParams(seed=100 + i, **SAMPLED) for i in range(6)])
    _assert_same(shared, independent)
    assert len({tuple(s.token_ids) for s in shared.samples}) > 1  # the samples differ
    assert shared.stats["kv_peak_blocks_used"] < independent.stats["kv_peak_blocks_used"]


def test_preemption_under_a_small_budget_gives_the_same_tokens(saved):
    _, path = saved["llama_gqa_tied"]
    params = [SamplingParams(temperature=0, max_new_tokens=30), SamplingParams(n=3, seed=3, **SAMPLED)]
    prompts = [PROMPTS[2], PROMPTS[0]]
    large = engine_for(path).generate(prompts, params)
    small_engine = engine_for(path, block_size=4)
    per_block = small_engine.shape.bytes_per_block
    small_engine.kv_cache_bytes = 12 * per_block  # one 13 + 30 token sequence needs 11 blocks
    small = small_engine.generate(prompts, params)
    assert 0 < small.stats["preemptions"] <= 4 and small.stats["kv_blocks"] == 12  # latest first, not all
    _assert_same(small, large, atol=1e-4)  # recomputed by prefill, not decode: last-bit differences


def test_log_probs_equal_train_engine(saved):
    _, path = saved["qwen2_bias"]
    train = TrainEngine(EngineConfig(model_path=str(path)))
    prompts = PROMPTS[:3]
    engine = RolloutEngine(train.model, block_size=4, kv_cache_bytes=1 << 22)
    engine.kv_cache_bytes = 10 * engine.shape.bytes_per_block  # preempts: recomputed rows count too
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, top_k=50, top_p=0.9, seed=0,
                                                  max_new_tokens=16))
    assert out.stats["preemptions"] > 0
    rows = [prompts[s.prompt_index] + s.token_ids for s in out.samples]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    expected = train.compute_log_probs({"input_ids": ids, "attention_mask": mask}, temperature=0.7)
    for row, s in enumerate(out.samples):
        start = len(prompts[s.prompt_index]) - 1  # column t predicts token t + 1
        torch.testing.assert_close(s.log_probs, expected[row, start:start + len(s.token_ids)], atol=1e-4, rtol=0)


def test_bad_input_is_refused_and_the_engine_stays_usable(saved):
    _, path = saved["llama_gqa_tied"]
    engine = engine_for(path)
    ok = SamplingParams(temperature=0, max_new_tokens=4)
    cases = [
        (([list(range(96))], ok), "max_model_len=96"),
        (([[]], ok), "prompts[0] is empty"),
        (([[1, 2]], SamplingParams(n=0)), "params[0].n=0"),
        (([[1, 2]], SamplingParams(top_p=0.0)), "top_p=0.0"),
        (([[1, 2]], SamplingParams(top_p=1.5)), "top_p=1.5"),
        (([[1, 128]], ok), "token id 128 outside the vocabulary [0, 128)"),
        (([[1, 2]], SamplingParams(stop_token_ids=[-1])), "stop_token_ids"),
        (([[1, 2], [3]], [ok]), "1 SamplingParams for 2 prompts"),
        (([[1.7, 2.9]], ok), "prompts[0] must be a 1-D list of integer token ids, got 1-D torch.float32"),
        (([torch.tensor([True, False])], ok), "got 1-D torch.bool"),
        (([[[1, 2]]], ok), "got 2-D"),
        (([[1, 2], [3, [4]]], ok), "prompts[1] is not a flat list of integer token ids"),
        ((["hello"], ok), "prompts[0] is text"),
        (([[1, 2]], [{"n": 1}]), "params[0] is a dict, not a SamplingParams"),
        (([[1, 2]], SamplingParams(n=True)), "params[0].n=True"),
        (([[1, 2]], SamplingParams(temperature=True)), "params[0].temperature=True"),
        (([[1, 2]], SamplingParams(n=2.0)), "params[0].n=2.0"),
        (([[1, 2]], SamplingParams(stop_token_ids=5)), "must be a list of token ids"),
    ]
    for (prompts, params), message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate(prompts, params)
    model = engine.model
    for kwargs, message in [(dict(max_model_len=97), "max_model_len=97 must be in [2, max_position_embeddings=96]"),
                            (dict(max_model_len=0), "max_model_len=0 must be"),
                            (dict(block_size=True), "block_size=True must be"),
                            (dict(kv_cache_bytes="1GB"), "kv_cache_bytes='1GB' must be"),
                            (dict(kv_cache_fraction=None), "kv_cache_fraction=None must be in (0, 1]")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            RolloutEngine(model, **kwargs)
    assert engine.generate([torch.tensor([1, 2])], SamplingParams(stop_token_ids=torch.tensor([3]), max_new_tokens=3,
                                                                  seed=1)).samples[0].token_ids  # tensors work
    tiny = engine_for(path, block_size=4)
    tiny.kv_cache_bytes = 2 * tiny.shape.bytes_per_block
    with pytest.raises(ValueError, match=r"needs 4 KV blocks .* holds 2 blocks"):
        tiny.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12))
    # exactly enough: 3 prompt + 6 new tokens keep 8 tokens in the cache = 2 blocks of 4
    assert len(tiny.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=6)).samples[0].token_ids) == 6
    assert engine.generate([[1, 2]], ok).samples[0].token_ids == engine.generate([[1, 2]], ok).samples[0].token_ids
    assert tiny.generate([[1, 2, 3]], ok).samples[0].token_ids == engine.generate([[1, 2, 3]], ok).samples[0].token_ids


def test_engine_from_the_rollout_config(saved):
    from hfrl.config import RolloutConfig

    _, path = saved["llama_gqa_tied"]
    cfg = RolloutConfig(block_size=8, kv_cache_bytes=1 << 20, max_num_seqs=3, max_model_len=40, n=2,
                        temperature=0.0, max_new_tokens=50, seed=4)
    engine = RolloutEngine.from_config(weights.from_pretrained(path).eval(), cfg)
    params = RolloutEngine.sampling_params(cfg, stop_token_ids=[7])
    assert (params.n, params.temperature, params.max_new_tokens, params.seed, params.stop_token_ids) == (2, 0.0, 50, 4, [7])
    out = engine.generate([PROMPTS[2]], params)  # 13 prompt tokens: max_model_len caps the response at 27
    assert out.stats["kv_block_size"] == 8 and out.stats["kv_cache_bytes"] <= 1 << 20
    assert all(len(s.token_ids) == 27 and s.finish_reason == "length" for s in out.samples if 7 not in s.token_ids)


def test_dynamic_rope_is_refused(tmp_path):
    ref = build_hf("llama_dynamic", **INIT)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        engine_for(tmp_path)


def test_tiny_temperature_is_greedy_and_huge_is_finite(saved):
    _, path = saved["llama_gqa_tied"]
    engine = engine_for(path)
    greedy = engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=8))
    tiny = engine.generate(PROMPTS[:2], SamplingParams(temperature=1e-38, max_new_tokens=8, seed=0))
    _assert_same(tiny, greedy)
    huge = engine.generate(PROMPTS[:2], SamplingParams(temperature=1e300, max_new_tokens=8, seed=0))
    for s in huge.samples:  # a uniform distribution over 128 tokens
        torch.testing.assert_close(s.log_probs, torch.full((8,), -math.log(128)))


def test_requests_too_big_to_share_are_split(saved):
    """n above max_num_seqs, and n samples whose shared prompt plus copies exceed the cache."""
    _, path = saved["llama_gqa_tied"]
    params = SamplingParams(n=5, seed=3, **SAMPLED)
    reference = engine_for(path).generate([PROMPTS[2]], params)
    narrow = engine_for(path, max_num_seqs=2).generate([PROMPTS[2]], params)
    _assert_same(narrow, reference, atol=1e-4)  # prefilled in other shapes: last-bit differences
    small = engine_for(path)
    small.kv_cache_bytes = 8 * small.shape.bytes_per_block  # 13-token prompt: 4 blocks + 4 copies > 8 - reserve
    _assert_same(small.generate([PROMPTS[2]], params), reference, atol=1e-4)


def test_per_prompt_seeds_from_the_config(saved):
    from hfrl.config import RolloutConfig

    cfg = RolloutConfig(n=2, seed=11, max_new_tokens=6)
    step0 = RolloutEngine.sampling_params(cfg, num_prompts=3, step=0)
    step1 = RolloutEngine.sampling_params(cfg, num_prompts=3, step=1)
    seeds = [p.seed for p in step0 + step1]
    assert len(set(seeds)) == 6 and min(abs(a - b) for a in seeds for b in seeds if a != b) > 1000
    assert [p.seed for p in RolloutEngine.sampling_params(cfg, num_prompts=3, step=0)] == seeds[:3]
    _, path = saved["llama_gqa_tied"]
    out = engine_for(path).generate([PROMPTS[0]] * 3, step0)
    assert len({tuple(s.token_ids) for s in out.samples}) == 6  # the same prompt, six different streams


@pytest.mark.parametrize("key_layout,compiled", [("token", False), ("dim", False), ("dim", True)])
@pytest.mark.parametrize("case", ["qwen2_bias", "mistral_window"])
def test_decode_forward_equals_the_model_forward(saved, case, key_layout, compiled, monkeypatch):
    """The engine's lean PyTorch decode step (RoPE table, F.linear, F.rms_norm) computes what the
    model's own forward computes through the same cache backend, bit for bit, and stores the same
    keys/values; the compiled step (hfrl_kernels.native: fused RoPE + cache write + attention, RMSNorm,
    SwiGLU, residuals inside addmm) the same to float rounding, for a biased q/k/v projection and a
    sliding window."""
    from hfrl.rollout.decode import DecodeForward, compiled_step
    from hfrl_kernels import native

    if compiled and not native.available():
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    if not compiled:
        monkeypatch.setattr(native, "available", lambda: False)
    from hfrl.rollout.kv_cache import CacheShape, DecodeAttention, PagedKVCache

    model = weights.from_pretrained(saved[case][1]).eval()
    config, attn = model.config, model.layers[0].attn
    shape = CacheShape(config.num_layers, attn.num_kv_heads, config.head_dim, 4, torch.float32)
    lens = torch.tensor([1, 7, 40, 23])  # positions past Mistral's window (32) too
    tables = torch.arange(4 * 10).view(4, 10)
    gen = torch.Generator().manual_seed(0)
    caches = []
    for _ in range(2):
        cache = PagedKVCache(shape, 40, torch.device("cpu"), key_layout=key_layout)
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen.manual_seed(1)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen.manual_seed(2)))
        caches.append(cache)
    pos = lens - 1
    slots = tables[torch.arange(4), pos // 4] * 4 + pos % 4
    tokens = torch.tensor([3, 17, 99, 5])

    def backend(cache):
        return DecodeAttention(cache, slots, tables.to(torch.int32), lens.to(torch.int32))

    with torch.no_grad():
        expected = model(tokens[None], position_ids=pos[None], attention=backend(caches[0]), return_hidden=True)[0]
        assert compiled_step(expected, backend(caches[1])) == compiled
        got = DecodeForward(model, config.max_position_embeddings)(tokens, pos, backend(caches[1]))
    if compiled:
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=1e-5)
        assert not torch.equal(got, expected)  # really another computation (else this case tests nothing)
    else:
        assert torch.equal(got, expected)  # bit for bit: same ops, fewer of them
        assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)


def test_packed_head_equals_the_plain_product():
    from hfrl.rollout.decode import PackedLinear

    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    packed = PackedLinear.of(weight)
    if not torch.backends.mkldnn.is_available():
        assert packed is None
        return
    for rows in (1, 2, 7, 64, 100):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(packed(x), x @ weight.t(), atol=1e-4, rtol=1e-5)
    assert PackedLinear.of(weight.bfloat16()) is None  # fp32 only: other dtypes keep the plain GEMM


def test_decode_linear_is_the_module_forward():
    """The decode step's Linear equals the module's forward bit for bit in bf16, bias included (a bias
    added after the product's rounding once differed in a quarter of the outputs: Qwen2's q/k/v)."""
    from torch import nn

    from hfrl.rollout.decode import linear

    torch.manual_seed(0)
    layer, x = nn.Linear(256, 384).bfloat16(), torch.randn(8, 256).bfloat16()
    with torch.no_grad():
        assert torch.equal(linear(layer, x), layer(x))
        torch.testing.assert_close(linear(layer.float(), x.float()), layer(x.float()), atol=1e-5, rtol=1e-5)
