"""The pure parts of hfrl.integrations.megatron, in one process and without megatron-core: the layout
check against hand-written Megatron groups, the degrees refused, the adopted (ranks, group) pairs,
the QKV regrouping and the vocab row moves."""
from __future__ import annotations

import pytest
import torch

from hfrl.integrations.megatron import (AdoptedGroups, MegatronLayout, check_layout, check_sizes, qkv_from_megatron,
                                        qkv_to_megatron, vocab_row_moves)

# 8 ranks, tp2 x dp2 x pp2, as Megatron's RankGenerator numbers them in its default order
# "tp-cp-ep-dp-pp" (tp fastest, then dp, then pp) and with order "tp-cp-ep-pp-dp".
DEFAULT_ORDER = {"tp": ((0, 1), (2, 3), (4, 5), (6, 7)), "dp": ((0, 2), (1, 3), (4, 6), (5, 7)),
                 "pp": ((0, 4), (1, 5), (2, 6), (3, 7)), "mp": ((0, 1, 4, 5), (2, 3, 6, 7))}
PP_BEFORE_DP = {"tp": ((0, 1), (2, 3), (4, 5), (6, 7)), "pp": ((0, 2), (1, 3), (4, 6), (5, 7)),
                "dp": ((0, 4), (1, 5), (2, 6), (3, 7)), "mp": ((0, 1, 2, 3), (4, 5, 6, 7))}


def layout(groups, tp=2, pp=2, dp=2):
    return MegatronLayout(world_size=tp * pp * dp, tp=tp, pp=pp, dp=dp, groups=groups)


def test_default_order_is_hfrls():
    dims = check_layout(layout(DEFAULT_ORDER), tg=1)
    assert (dims.pp, dims.tp, dims.dp, dims.tg, dims.dg) == (2, 2, 2, 1, 2)


def test_other_rank_order_refused_naming_the_groups():
    with pytest.raises(ValueError) as err:
        check_layout(layout(PP_BEFORE_DP))
    assert "Megatron's pp groups [[0, 2], [1, 3], [4, 6], ...] are not hfrl's [[0, 4], [1, 5], [2, 6], ...]" \
        in str(err.value)
    assert "'tp-cp-ep-dp-pp'" in str(err.value)


def test_group_order_inside_a_group_matters():
    flipped = dict(DEFAULT_ORDER, pp=((4, 0), (1, 5), (2, 6), (3, 7)))   # a pipeline run backwards
    with pytest.raises(ValueError, match="pp groups"):
        check_layout(layout(flipped))


def test_sizes_refused_all_at_once():
    with pytest.raises(ValueError) as err:
        check_sizes(8, tp=2, pp=1, dp=2, cp=2, ep=2, vpp=2)
    message = str(err.value)
    for word in ("context_parallel_size=2", "expert_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2"):
        assert word in message
    check_sizes(8, tp=2, pp=2, dp=2)   # cp = ep = 1, no virtual stages: accepted


def test_pairs_are_the_same_rank_sets_on_every_rank():
    import torch.distributed as dist

    groups = {"tp": ((0, 1), (2, 3)), "pp": ((0,), (1,), (2,), (3,)), "dp": ((0, 2), (1, 3)), "mp": ((0, 1), (2, 3))}
    dims = check_layout(layout(groups, tp=2, pp=1, dp=2))
    views = []
    for rank in range(4):
        own = {axis: f"{axis}@{rank}" for axis in groups}   # stand-ins for this rank's group objects
        views.append(AdoptedGroups(layout=layout(groups, tp=2, pp=1, dp=2), dims=dims, own=own, rank=rank).pairs())
    keys = [[ranks for ranks, _ in pairs] for pairs in views]
    assert all(k == keys[0] for k in keys)   # every rank adopts the same sets, in the same order
    # mp = tp at pp = 1: adopted once (Megatron's tp group); the whole world gets the default group
    assert keys[0] == [(0, 1), (2, 3), (0,), (1,), (2,), (3,), (0, 2), (1, 3), (0, 1, 2, 3)]
    rank1 = dict(views[1])
    assert rank1[(0, 1)] == "tp@1" and rank1[(1,)] == "pp@1" and rank1[(1, 3)] == "dp@1"
    assert rank1[(2, 3)] is dist.GroupMember.NON_GROUP_MEMBER and rank1[(0, 2)] is dist.GroupMember.NON_GROUP_MEMBER


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [(4, 2, 2), (8, 2, 1), (6, 6, 3), (12, 4, 2)])
def test_qkv_regrouping(num_heads, num_kv_heads, tp):
    head_dim = 3
    groups, per_group = num_kv_heads // tp, num_heads // num_kv_heads
    # Megatron's local rows, labelled: query group g holds [q heads g*per_group.. ; k_g; v_g]
    labels = []
    for g in range(groups):
        labels += [("q", g * per_group + h, d) for h in range(per_group) for d in range(head_dim)]
        labels += [("k", g, d) for d in range(head_dim)] + [("v", g, d) for d in range(head_dim)]
    code = {label: i for i, label in enumerate(sorted(labels))}
    megatron = torch.tensor([float(code[label]) for label in labels])[:, None].repeat(1, 5)
    hfrl = qkv_from_megatron(megatron, num_heads, num_kv_heads, head_dim, tp)
    expected = ([("q", h, d) for h in range(groups * per_group) for d in range(head_dim)]
                + [("k", g, d) for g in range(groups) for d in range(head_dim)]
                + [("v", g, d) for g in range(groups) for d in range(head_dim)])
    assert hfrl[:, 0].tolist() == [float(code[label]) for label in expected]
    assert torch.equal(qkv_to_megatron(hfrl, num_heads, num_kv_heads, head_dim, tp), megatron)
    bias = megatron[:, 0]   # 1-D: a linear_qkv bias regroups the same way
    assert torch.equal(qkv_from_megatron(bias, num_heads, num_kv_heads, head_dim, tp), hfrl[:, 0])


def test_vocab_row_moves():
    # Megatron pads 20 true rows to 32 over tp=2 (16 a rank); hfrl holds ceil(20/2) = 10 a rank.
    assert vocab_row_moves(20, 16, 10, 2) == [(0, 0, 0, 10), (0, 1, 10, 16), (1, 1, 16, 20)]
    assert vocab_row_moves(20, 10, 16, 2) == [(0, 0, 0, 10), (1, 0, 10, 16), (1, 1, 16, 20)]
    # Every true row moves exactly once, for uneven splits too; padding rows (>= V) never do.
    for vocab, src, dst, tp in [(13, 64, 4, 4), (100, 32, 25, 4), (7, 2, 3, 3)]:
        moved = sorted(row for _, _, lo, hi in vocab_row_moves(vocab, src, dst, tp) for row in range(lo, hi))
        assert moved == list(range(min(vocab, src * tp, dst * tp)))
