"""Micro-batching: budgets, coverage, loss weights, gradient accumulation, packing, DP balance."""
import random

import pytest
import torch
import torch.nn.functional as F

from hfrl.engine.microbatch import (balance_across_dp, make_micro_batches, merge_micro_batch_outputs,
                                    pack_sequences, partition_by_count, partition_by_token_budget,
                                    unpack_sequences)
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM

VOCAB, PROMPT, RESPONSE = 64, 5, 6


def rlhf_batch(batch_size: int = 10, seed: int = 0) -> dict:
    """Left-padded prompts + right-padded responses, as rollouts come: (B, 11) with pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, PROMPT + 1, (batch_size,), generator=gen)
    response_len = torch.randint(1, RESPONSE + 1, (batch_size,), generator=gen)
    cols = torch.arange(PROMPT + RESPONSE)
    prompt_real = (cols[None] >= PROMPT - prompt_len[:, None]) & (cols[None] < PROMPT)
    response_mask = (cols[None] >= PROMPT) & (cols[None] < PROMPT + response_len[:, None])
    attention_mask = (prompt_real | response_mask).long()
    input_ids = torch.randint(1, VOCAB, (batch_size, PROMPT + RESPONSE), generator=gen) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask.long(),
            "rewards": torch.randn(batch_size, generator=gen)}


def tiny_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                                max_position_embeddings=64))


def response_loss(logits, input_ids, response_mask):
    """Token-mean NLL of response tokens; logits (n, t, V) predict the next column."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (n, t-1)
    mask = response_mask[:, 1:].float()
    return -(logp * mask).sum() / mask.sum()


def micro_batch_loss(model, mb):
    if mb.packed:
        logits = unpack_sequences(model(mb.data["input_ids"], position_ids=mb.data["position_ids"],
                                        cu_seqlens=mb.data["cu_seqlens"]), mb.attention_mask)
        ids = unpack_sequences(mb.data["input_ids"], mb.attention_mask)
        mask = unpack_sequences(mb.data["response_mask"], mb.attention_mask)
    else:
        logits = model(mb.data["input_ids"], attention_mask=mb.data["attention_mask"])
        ids, mask = mb.data["input_ids"], mb.data["response_mask"]
    return response_loss(logits, ids, mask)


# ---- splitting --------------------------------------------------------------------------------------

def test_token_budget_respected_and_every_sequence_once():
    batch = rlhf_batch(16)
    lengths = batch["attention_mask"].sum(1).tolist()
    budget = 9
    assert max(lengths) > budget  # some sequences must go alone
    mbs = make_micro_batches(batch, max_tokens_per_micro_batch=budget, loss_mask_key="response_mask")
    assert sorted(i for mb in mbs for i in mb.indices) == list(range(16))
    for mb in mbs:
        tokens = sum(lengths[i] for i in mb.indices)
        assert tokens <= budget or len(mb.indices) == 1
        rows = torch.tensor(mb.indices)
        start, end = mb.columns
        for key in ("input_ids", "attention_mask", "response_mask"):
            assert torch.equal(mb.data[key], batch[key][rows, start:end])
        assert torch.equal(mb.data["rewards"], batch["rewards"][rows])  # per-sequence: rows only
        kept = mb.data["attention_mask"]
        assert kept[:, 0].any() and kept[:, -1].any()  # no all-pad edge column left
        assert batch["attention_mask"][rows][:, :start].sum() == 0 and batch["attention_mask"][rows][:, end:].sum() == 0
        assert mb.num_tokens == int(batch["response_mask"][rows].sum())
    assert sum(mb.loss_weight for mb in mbs) == pytest.approx(1.0, abs=1e-12)
    assert len(mbs) < 16  # short sequences were packed together


def test_first_fit_decreasing_bins():
    assert partition_by_token_budget([5, 1, 7, 3, 20, 2], 8) == [[4], [1, 2], [0, 3], [5]]


def test_split_by_count_is_contiguous_and_near_equal():
    assert partition_by_count(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    mbs = make_micro_batches(rlhf_batch(10), num_micro_batches=3, trim_padding=False)
    assert [mb.indices for mb in mbs] == partition_by_count(10, 3)
    assert all(mb.columns == (0, PROMPT + RESPONSE) for mb in mbs)
    assert sum(mb.loss_weight for mb in mbs) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_micro_batches"):
        partition_by_count(3, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one"),
    (dict(num_micro_batches=2, max_tokens_per_micro_batch=8), "exactly one"),
    (dict(num_micro_batches=2, loss_mask_key="loss_mask"), "loss_mask"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_micro_batches(rlhf_batch(4), **kwargs)


# ---- numerics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_accumulated_gradients_equal_full_batch(packed):
    batch = rlhf_batch(12)
    full_model, model = tiny_model(), tiny_model()
    full_loss = response_loss(full_model(batch["input_ids"], attention_mask=batch["attention_mask"]),
                              batch["input_ids"], batch["response_mask"])
    full_loss.backward()
    mbs = make_micro_batches(batch, max_tokens_per_micro_batch=20, loss_mask_key="response_mask", packed=packed)
    assert len(mbs) > 2
    total = 0.0
    for mb in mbs:
        loss = micro_batch_loss(model, mb) * mb.loss_weight
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full_loss.item(), rel=1e-6)
    for (name, p), q in zip(full_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_micro_batches_give_padded_losses():
    batch = rlhf_batch(12, seed=3)
    model = tiny_model()
    kwargs = dict(max_tokens_per_micro_batch=24, loss_mask_key="response_mask")
    padded = make_micro_batches(batch, **kwargs)
    packed = make_micro_batches(batch, packed=True, **kwargs)
    with torch.no_grad():
        for a, b in zip(padded, packed):
            assert a.indices == b.indices and b.data["input_ids"].shape == (1, int(a.attention_mask.sum()))
            assert "attention_mask" not in b.data
            assert micro_batch_loss(model, b).item() == pytest.approx(micro_batch_loss(model, a).item(), rel=1e-5)


def test_pack_sequences_layout():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    ids = torch.tensor([[0, 5, 6, 0], [1, 2, 3, 4], [0, 0, 9, 0]])
    packed = pack_sequences({"input_ids": ids, "attention_mask": mask, "score": torch.ones(3)}, mask)
    assert packed["input_ids"].tolist() == [[5, 6, 1, 2, 3, 4, 9]]
    assert packed["cu_seqlens"].tolist() == [0, 2, 6, 7] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert packed["score"].shape == (3,)
    assert torch.equal(unpack_sequences(packed["input_ids"], mask), ids)


@pytest.mark.parametrize("packed", [False, True])
def test_merge_outputs_restores_batch_order(packed):
    batch = rlhf_batch(14, seed=5)
    mbs = make_micro_batches(batch, max_tokens_per_micro_batch=16, packed=packed)
    assert [i for mb in mbs for i in mb.indices] != list(range(14))  # the split reordered rows
    per_token = merge_micro_batch_outputs([mb.data["input_ids"] for mb in mbs], mbs, 14, PROMPT + RESPONSE)
    assert torch.equal(per_token, batch["input_ids"])  # pads are 0 = the fill value
    per_seq = merge_micro_batch_outputs([mb.data["rewards"] for mb in mbs], mbs, 14, PROMPT + RESPONSE)
    assert torch.equal(per_seq, batch["rewards"])


# ---- DP balance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("equal_size", [True, False])
def test_balance_across_dp(equal_size):
    rng = random.Random(0)
    lengths = [rng.randint(16, 1024) for _ in range(64)]
    groups = balance_across_dp(lengths, 4, equal_size=equal_size)
    assert sorted(i for g in groups for i in g) == list(range(64))
    if equal_size:
        assert [len(g) for g in groups] == [16] * 4
    totals = [sum(lengths[i] for i in g) for g in groups]
    contiguous = [sum(lengths[i * 16:(i + 1) * 16]) for i in range(4)]
    spread = max(totals) - min(totals)
    assert spread <= max(lengths)  # the proven bound of the differencing merges
    assert spread * 20 < max(contiguous) - min(contiguous)  # far better than splitting in order
    assert spread <= 0.002 * sum(lengths) / 4  # near-equal in practice


def test_balance_small_cases():
    groups = balance_across_dp([10, 9, 8, 7, 6, 5, 4, 3], 2)
    assert sorted(sum([10, 9, 8, 7, 6, 5, 4, 3][i] for i in g) for g in groups) == [26, 26]
    assert balance_across_dp([5, 1], 4, equal_size=False)[2:] == [[], []]
    with pytest.raises(ValueError, match="equal size"):
        balance_across_dp([1, 2, 3], 2)
