"""hfrl's decoder against transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForSequenceClassification

from hfrl.models import weights
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from tests.models._hf import CASES, ROPE_CASES, build_hf

T = 12  # longer than the sliding windows (4) and than llama_dynamic's max_position_embeddings (8)
TOL = 1e-5


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, hfrl model loaded from its save_pretrained folder)."""
    ref = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, weights.from_pretrained(path).eval()


def padded_batch(left: bool):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, T))
    lengths = [T, 7, 3]
    mask = torch.zeros(3, T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1 if left else 0
        mask[row, :n] = 0 if left else 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@torch.no_grad()
def test_logits_match_unpadded(pair):
    ref, model = pair
    ids = torch.randint(0, 128, (2, T))
    assert (model(ids) - ref(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@torch.no_grad()
def test_logits_match_padded(pair, left):
    ref, model = pair
    ids, mask, position_ids = padded_batch(left)
    expected = ref(ids, attention_mask=mask, position_ids=position_ids).logits
    got = model(ids, attention_mask=mask)  # hfrl derives the same position ids from the mask
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < TOL
    assert torch.isfinite(got).all()  # padding positions too: they must not poison gradients


@torch.no_grad()
def test_packed_sequences_match_each_sequence_alone(pair):
    ref, model = pair
    lengths = [5, 3, 8]
    seqs = [torch.randint(0, 128, (1, n)) for n in lengths]
    cu_seqlens = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    got = model(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens)  # (1, 16, V)
    for seq, start in zip(seqs, cu_seqlens[:-1].tolist()):
        expected = ref(seq).logits
        assert (got[:, start:start + seq.shape[1]] - expected).abs().max() < TOL


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op returns while active: forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


def _pack(lengths: list[int], seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (1, n), generator=g) for n in lengths]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, cu_seqlens


@pytest.mark.parametrize("case", ["llama_gqa_tied", "mistral_window"])
def test_packed_attention_memory_is_linear_in_pack_length(case):
    """Twice the sequences in a pack: no intermediate of forward + backward may grow more than twice.

    A (total x total) mask, or attention weights over the whole pack, grow four times.
    """
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(build_hf(case).config))
    largest = {}
    for num_seqs in (8, 16):
        seqs, cu_seqlens = _pack([64] * num_seqs)
        with _LargestTensor() as mode:
            model(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens).logsumexp(-1).sum().backward()
        largest[num_seqs] = mode.numel
    assert largest[16] <= 2 * largest[8], largest


@pytest.mark.parametrize("case", ["llama_gqa_tied", "mistral_window", "qwen2_sliding_layers"])
@torch.no_grad()
def test_many_packed_sequences_match_transformers(case, tmp_path):
    """Ragged lengths (1 up to past the sliding window), and trailing tokens after cu_seqlens[-1]."""
    ref = build_hf(case)
    ref.save_pretrained(tmp_path)
    model = weights.from_pretrained(tmp_path).eval()
    lengths = [1, 7, 3, 12, 2, 4, 5, 9, 1, 6]
    seqs, cu_seqlens = _pack(lengths)
    trailing = torch.randint(0, 128, (1, 3))  # one more sequence, not listed in cu_seqlens
    got = model(torch.cat([*seqs, trailing], dim=1), cu_seqlens=cu_seqlens)  # (1, 53, V)
    starts = cu_seqlens.tolist()
    for seq, start in zip([*seqs, trailing], starts):
        assert (got[:, start:start + seq.shape[1]] - ref(seq).logits).abs().max() < TOL


@pytest.mark.parametrize("case", list(ROPE_CASES))
@torch.no_grad()
def test_rope_scaling_matches(case, tmp_path):
    ref = build_hf(case)
    ref.save_pretrained(tmp_path)
    model = weights.from_pretrained(tmp_path).eval()
    assert model.config.rope_type == case.split("_")[1]
    ids = torch.randint(0, 128, (2, T))
    assert (model(ids) - ref(ids).logits).abs().max() < TOL


@torch.no_grad()
def test_value_head_matches_sequence_classification(tmp_path):
    ref = build_hf("llama_gqa_tied", LlamaForSequenceClassification, num_labels=1, pad_token_id=0)
    ref.save_pretrained(tmp_path)
    critic = weights.from_pretrained(tmp_path, value_head=True).eval()
    ids, mask, position_ids = padded_batch(left=False)
    ids = ids.clamp(min=1) * mask  # pad id 0 exactly where the mask is 0, for HF's pooling
    hidden = ref.model(ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    expected = ref.score(hidden).squeeze(-1)  # per-token scores before HF pools them
    values = critic(ids, attention_mask=mask)  # (B, T)
    assert values.shape == ids.shape
    real = mask.bool()
    assert (values[real] - expected[real]).abs().max() < TOL
    pooled = ref(ids, attention_mask=mask, position_ids=position_ids).logits.squeeze(-1)  # last real token
    last = mask.sum(-1) - 1
    assert (values[torch.arange(3), last] - pooled).abs().max() < TOL


@torch.no_grad()
def test_pipeline_stages_compose_to_full_model(tmp_path):
    build_hf("llama_gqa_tied").save_pretrained(tmp_path)
    full = weights.from_pretrained(tmp_path).eval()
    config = full.config
    first, last = CausalLM(config, layer_range=(0, 1)), CausalLM(config, layer_range=(1, 3))
    assert first.lm_head is None and first.norm is None and last.embed_tokens is None
    assert [layer.layer_idx for layer in last.layers] == [1, 2] and last.layer_offset == 1
    for stage in (first, last):
        weights.load_hf_weights(stage, tmp_path)  # tied: the last stage's lm_head comes from embed_tokens
    ids, mask, _ = padded_batch(left=True)
    hidden = first(ids, attention_mask=mask)  # (B, T, H): no head, no norm
    assert hidden.shape == (3, T, config.hidden_size)
    logits = last(hidden_states=hidden, attention_mask=mask)
    assert (logits - full(ids, attention_mask=mask)).abs().max() < TOL
    with pytest.raises(ValueError, match="hidden_states"):
        last(ids)


@torch.no_grad()
def test_return_hidden_gives_head_input(pair):
    _, model = pair
    ids = torch.randint(0, 128, (2, T))
    hidden = model(ids, return_hidden=True)  # (B, T, H), after the final norm
    assert torch.equal(model.lm_head(hidden), model(ids))


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    config = ModelConfig.from_hf(build_hf("mistral_window").config)
    model = CausalLM(config)
    ids, mask, _ = padded_batch(left=True)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask)[mask.bool()].logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_activation_checkpointing(True)
    assert all(layer.activation_checkpointing_enabled for layer in model.layers)
    checkpointed = grads()
    assert all(torch.isfinite(g).all() for g in plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_bf16_keeps_fp32_rope_and_rejects_mixed_inputs():
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                         num_kv_heads=2)
    model = CausalLM(config).to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert model(torch.randint(0, 128, (1, 5))).dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="not both"):
        model(ids, attention_mask=torch.ones_like(ids), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
