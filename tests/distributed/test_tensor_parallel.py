"""Tensor-parallel communication, layers and vocab-parallel log-softmax on real gloo processes.

One 4-process run covers tp = 1 (singleton groups), 2 ([0 1] [2 3]) and 4 (the world): every check
builds the full tensors from a seed on every rank, shards them, and returns the max difference
from the single-process computation (values and gradients) for the parent to assert.
"""
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hfrl.distributed.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead, copy_to_tp_region,
    gather_from_tp_region, gather_vocab_logits, padded_vocab_size, reduce_from_tp_region, scatter_to_tp_region,
    vocab_parallel_entropy, vocab_parallel_log_probs,
)
from tests.multiproc import run_ranks

TOL = 1e-5
VOCABS = (100, 101, 5)  # divisible by 4; padded (104 at tp=4, 102 at tp=2); a rank holding only padding


def _randn(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _all_gather_cat(x, group, dim):
    tp = dist.get_world_size(group) if group is not None else 1
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _members(group):
    return dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]


def check_communication(group):
    """f/g pairs: forward values and the gradients their backward must give."""
    members, rank = _members(group), dist.get_rank()
    out = {}
    x = _randn(rank, 3, 8).requires_grad_()  # different on each rank
    w = _randn(100, 3, 8)  # same upstream gradient everywhere
    y = reduce_from_tp_region(x, group)
    (y * w).sum().backward()
    out["reduce_fwd"] = _diff(y, sum(_randn(r, 3, 8) for r in members))
    out["reduce_bwd"] = _diff(x.grad, w)

    x = _randn(100, 3, 8).requires_grad_()  # replicated input
    (copy_to_tp_region(x, group) * _randn(rank, 3, 8)).sum().backward()
    out["copy_bwd"] = _diff(x.grad, sum(_randn(r, 3, 8) for r in members))

    x = _randn(rank, 3, 4).requires_grad_()
    w = _randn(100, 3, 4 * len(members))
    y = gather_from_tp_region(x, group)
    (y * w).sum().backward()
    out["gather_fwd"] = _diff(y, torch.cat([_randn(r, 3, 4) for r in members], dim=-1))
    out["gather_bwd"] = _diff(x.grad, w.chunk(len(members), dim=-1)[members.index(rank)])

    x = _randn(100, 3, 4 * len(members)).requires_grad_()
    y = scatter_to_tp_region(x, group)
    (y * _randn(rank, 3, 4)).sum().backward()
    out["scatter_fwd"] = _diff(y, x.chunk(len(members), dim=-1)[members.index(rank)])
    out["scatter_bwd"] = _diff(x.grad, torch.cat([_randn(r, 3, 4) for r in members], dim=-1))
    return out


def check_linear_pair(group):
    """Column-parallel -> SiLU -> row-parallel equals the full two-layer MLP, gradients included."""
    members = _members(group)
    tp, tp_rank = len(members), members.index(dist.get_rank())
    w1, b1, w2, b2 = _randn(1, 16, 8), _randn(2, 16), _randn(3, 8, 16), _randn(4, 8)
    x, upstream = _randn(5, 2, 5, 8), _randn(6, 2, 5, 8)
    full = [t.clone().requires_grad_() for t in (w1, b1, w2, b2, x)]
    (F.linear(F.silu(F.linear(full[4], full[0], full[1])), full[2], full[3]) * upstream).sum().backward()

    col, row = ColumnParallelLinear(8, 16, True, group), RowParallelLinear(16, 8, True, group)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(tp, 0)[tp_rank]), col.bias.copy_(b1.chunk(tp, 0)[tp_rank])
        row.weight.copy_(w2.chunk(tp, 1)[tp_rank]), row.bias.copy_(b2)
    x_local = x.clone().requires_grad_()
    y = row(F.silu(col(x_local)))
    (y * upstream).sum().backward()
    return {
        "mlp_fwd": _diff(y, F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)),
        "mlp_grad_w1": _diff(_all_gather_cat(col.weight.grad, group, 0), full[0].grad),
        "mlp_grad_b1": _diff(_all_gather_cat(col.bias.grad, group, 0), full[1].grad),
        "mlp_grad_w2": _diff(_all_gather_cat(row.weight.grad, group, 1), full[2].grad),
        "mlp_grad_b2": _diff(row.bias.grad, full[3].grad),
        "mlp_grad_x": _diff(x_local.grad, full[4].grad),
        "tags": (col.weight.hfrl_shard, col.bias.hfrl_shard, row.weight.hfrl_shard, hasattr(row.bias, "hfrl_shard")),
    }


def _vocab_shard(full_rows, group):
    """This rank's rows of a (V, ...) tensor padded with zero rows to a multiple of tp."""
    members = _members(group)
    tp, tp_rank = len(members), members.index(dist.get_rank())
    v = full_rows.shape[0]
    padded = torch.cat([full_rows, full_rows.new_zeros(padded_vocab_size(v, tp) - v, *full_rows.shape[1:])])
    return padded.chunk(tp, 0)[tp_rank]


def check_vocab_layers(group, vocab):
    """Embedding lookup and LM head over a (possibly padded) sharded vocab, with gradients."""
    emb_w, ids = _randn(10, vocab, 8), torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(11))
    ids[0, :2] = torch.tensor([0, vocab - 1])
    upstream = _randn(12, 2, 7, 8)
    emb_full = emb_w.clone().requires_grad_()
    (F.embedding(ids, emb_full) * upstream).sum().backward()
    emb = VocabParallelEmbedding(vocab, 8, group)
    with torch.no_grad():
        emb.weight.copy_(_vocab_shard(emb_w, group))
    y = emb(ids)
    (y * upstream).sum().backward()
    emb_grad = _all_gather_cat(emb.weight.grad, group, 0)

    hidden, labels = _randn(13, 2, 7, 8), torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(14))
    head_full = emb_w.clone().requires_grad_()
    full_logits = F.linear(hidden, head_full)
    torch.log_softmax(full_logits, -1).gather(-1, labels[..., None]).sum().backward()
    head = VocabParallelLMHead(8, vocab, group)
    with torch.no_grad():
        head.weight.copy_(_vocab_shard(emb_w, group))
    local_logits = head(hidden)  # (2, 7, V_pad/tp)
    vocab_parallel_log_probs(local_logits, labels, group).sum().backward()
    head_grad = _all_gather_cat(head.weight.grad, group, 0)
    gathered = _all_gather_cat(local_logits.detach(), group, -1)
    return {
        "embed_fwd": _diff(y, F.embedding(ids, emb_w)),
        "embed_grad": _diff(emb_grad[:vocab], emb_full.grad),
        "embed_pad_grad": emb_grad[vocab:].abs().sum().item(),
        "head_fwd": _diff(gather_vocab_logits(local_logits, group, vocab), full_logits),
        "head_pad_is_neg_inf": bool((gathered[..., vocab:] == float("-inf")).all()),
        "head_grad": _diff(head_grad[:vocab], head_full.grad),
        "head_pad_grad": head_grad[vocab:].abs().sum().item(),
        "tags": (emb.weight.hfrl_shard, head.weight.hfrl_shard),
    }


def check_log_softmax(group, vocab, pad_with_inf):
    """vocab_parallel_log_probs / entropy and their logit gradients equal the full computation.

    pad_with_inf: padded columns hold -inf (as the LM head writes them); otherwise they hold finite
    garbage and ``vocab_size`` masks them.
    """
    members = _members(group)
    tp = len(members)
    logits, labels = _randn(20, 3, 5, vocab, scale=4.0), torch.randint(0, vocab, (3, 5),
                                                                    generator=torch.Generator().manual_seed(21))
    labels[0, :2] = torch.tensor([0, vocab - 1])
    w_lp, w_ent = _randn(22, 3, 5), _randn(23, 3, 5)

    full = logits.clone().requires_grad_()
    log_p = torch.log_softmax(full, -1)
    ref_lp = log_p.gather(-1, labels[..., None]).squeeze(-1)
    (ref_lp * w_lp).sum().backward()
    ref_lp_grad, full.grad = full.grad, None
    log_p = torch.log_softmax(full, -1)
    ref_ent = -(log_p.exp() * log_p).sum(-1)
    (ref_ent * w_ent).sum().backward()

    pad_value = float("-inf") if pad_with_inf else 7.0
    padded = torch.cat([logits, logits.new_full((3, 5, padded_vocab_size(vocab, tp) - vocab), pad_value)], -1)
    shard = padded.chunk(tp, -1)[members.index(dist.get_rank())]
    kwargs = {} if pad_with_inf else {"vocab_size": vocab}
    lp_in, ent_in = shard.clone().requires_grad_(), shard.clone().requires_grad_()
    lp = vocab_parallel_log_probs(lp_in, labels, group, **kwargs)
    (lp * w_lp).sum().backward()
    ent = vocab_parallel_entropy(ent_in, group, **kwargs)
    (ent * w_ent).sum().backward()
    lp_grad, ent_grad = _all_gather_cat(lp_in.grad, group, -1), _all_gather_cat(ent_in.grad, group, -1)
    return {
        "logp_fwd": _diff(lp, ref_lp),
        "logp_grad": _diff(lp_grad[..., :vocab], ref_lp_grad),
        "entropy_fwd": _diff(ent, ref_ent),
        "entropy_grad": _diff(ent_grad[..., :vocab], full.grad),
        "pad_grad": (lp_grad[..., vocab:].abs().sum() + ent_grad[..., vocab:].abs().sum()).item(),
        "finite": bool(torch.isfinite(lp_grad).all() and torch.isfinite(ent_grad).all()),
    }


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def tp_body(rank, world_size):
    handler = _Messages()
    logging.getLogger("hfrl.distributed.tensor_parallel").addHandler(handler)
    singles = [dist.new_group([r]) for r in range(world_size)]  # collective: every rank makes every group
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {"none": None, "1": singles[rank], "2": pairs[rank // 2], "4": dist.group.WORLD}
    results = {}
    for tp, group in groups.items():
        results[(tp, "communication")] = check_communication(group)
        results[(tp, "linear")] = check_linear_pair(group)
        for vocab in VOCABS:
            results[(tp, f"vocab_layers_{vocab}")] = check_vocab_layers(group, vocab)
            for pad_with_inf in (True, False):
                results[(tp, f"log_softmax_{vocab}_{pad_with_inf}")] = check_log_softmax(group, vocab, pad_with_inf)
    return results, handler.messages


@pytest.fixture(scope="module")
def run():
    return run_ranks(4, tp_body, init=True)


@pytest.fixture(scope="module")
def results(run):
    return [per_rank for per_rank, _ in run]


def _values(results, check):
    """(rank, tp, name, value) for every metric of checks whose name starts with ``check``."""
    for rank, per_rank in enumerate(results):
        for (tp, name), metrics in per_rank.items():
            if name.startswith(check):
                for metric, value in metrics.items():
                    yield rank, tp, f"{name}.{metric}", value


@pytest.mark.parametrize("check", ["communication", "linear", "vocab_layers", "log_softmax"])
def test_matches_single_process(results, check):
    seen = 0
    for rank, tp, name, value in _values(results, check):
        seen += 1
        if name.endswith("tags"):
            assert value[:2] in (("column", "column"), ("vocab", "vocab")), (rank, tp, name, value)
            assert value[2:] in ((), ("row", False)), (rank, tp, name, value)
        elif isinstance(value, bool):
            assert value, (rank, tp, name)
        else:
            assert value < TOL, (rank, tp, name, value)
    assert seen >= 4 * 4  # every rank, every tp


def test_single_process_bf16_and_extreme_logits():
    """group=None: fp32 results from bf16 logits, grads in the input dtype; huge logits stay finite."""
    logits = (torch.randn(2, 3, 11) * 1e4).requires_grad_()
    labels = torch.randint(0, 11, (2, 3))
    lp = vocab_parallel_log_probs(logits, labels)
    ent = vocab_parallel_entropy(logits)
    (lp.sum() + ent.sum()).backward()
    ref = torch.log_softmax(logits.detach(), -1)
    assert torch.allclose(lp, ref.gather(-1, labels[..., None]).squeeze(-1))
    assert torch.isfinite(ent).all() and torch.isfinite(logits.grad).all()
    half = torch.randn(2, 3, 11).bfloat16().requires_grad_()
    out = vocab_parallel_log_probs(half, labels)
    out.sum().backward()
    assert out.dtype == torch.float32 and half.grad.dtype == torch.bfloat16


def test_vocab_padding_is_logged_once_by_tp_rank_0(run):
    """One line per padded (V, tp), from TP rank 0 only: ranks 0 (tp=2 and 4) and 2 (tp=2)."""
    messages = [m for _, m in run]
    assert messages[1] == [] and messages[3] == []
    assert sorted(messages[0]) == sorted(messages[2] + ["vocab padded from 101 to 104 to split it evenly over tp=4 "
                                                        "(padded logits are -inf)",
                                                        "vocab padded from 5 to 8 to split it evenly over tp=4 "
                                                        "(padded logits are -inf)"])
    assert len(messages[2]) == 2 and "from 101 to 102" in " ".join(messages[2])
