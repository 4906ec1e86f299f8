"""DP gradient reduction overlapped with backward equals the reduction after backward, on real gloo ranks.

One 4-process run covers dp=2 (two pairs) and dp=4, ZeRO-0 (``MixedPrecisionAdamW``) and ZeRO-1, fp32 and
bf16. Each step has 3 micro-batches (1 in the last step, so the hooks arm at once); the model has a
parameter that gets no gradient in the last micro-batch (its bucket must still be reduced, by ``finish``)
and one deferred parameter whose accumulated gradient is changed between backward and ``finish`` (as
the engine sums a tied embedding's two copies), which a bucket launched too early would miss.
(The 4 processes also run other modules' bodies: see tests.engine.test_train_engine.shared_4rank_run.)
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hfrl.distributed.data_parallel import ZeroOneOptimizer
from hfrl.distributed.grad_overlap import overlapped_allreduce, overlapped_zero_one, plan_flat_buckets
from hfrl.engine.optim import MixedPrecisionAdamW, param_groups
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from tests.engine.test_train_engine import shared_4rank_run

VOCAB, BATCH, SEQ, LR, WD, EPS = 64, 12, 10, 1e-2, 0.1, 1e-4
MICRO_BATCHES = [3, 1]  # per step
BUCKET_MB = 0.01  # ~10 KB: several buckets


class OverlapLM(nn.Module):
    """A small CausalLM between ``offset`` (first: reduced last; unused by a step's last micro-batch)
    and ``temperature`` (last: its gradient is ready first)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.offset = nn.Parameter(torch.linspace(-1.0, 1.0, 7))
        self.lm = CausalLM(ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                       num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                                       max_position_embeddings=64))
        self.temperature = nn.Parameter(torch.linspace(0.9, 1.1, 5))

    def loss(self, input_ids: torch.Tensor, last: bool) -> torch.Tensor:
        logits = self.lm(input_ids).float() / self.temperature.float().mean()  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
        return loss if last else loss + 0.1 * self.offset.float().square().sum()


def rows(step: int, dp: int, dp_rank: int) -> torch.Tensor:
    batch = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    return batch.chunk(dp)[dp_rank]


def build(kind: str, dtype: torch.dtype, group):
    model = OverlapLM().to(dtype)
    groups = param_groups(model.parameters(), WD)
    if kind == "zero1":
        return model, ZeroOneOptimizer(groups, group, lr=LR, eps=EPS, weight_decay=WD)
    return model, MixedPrecisionAdamW(groups, group, bucket_mb=BUCKET_MB, lr=LR, eps=EPS, weight_decay=WD)


def train(kind: str, dtype: torch.dtype, group, dp: int, dp_rank: int, overlap: bool) -> dict:
    model, opt = build(kind, dtype, group)
    deferred = model.lm.lm_head.weight  # ready first in backward: without deferral it would go first
    reducer = None
    if overlap and kind == "zero1":
        reducer = overlapped_zero_one(opt, BUCKET_MB, [deferred], order=model.parameters())
    elif overlap:
        reducer = overlapped_allreduce(opt.model_params, opt.master_params, group, BUCKET_MB, [deferred],
                                       order=model.parameters())
    launched = []  # per step: buckets launched when each backward returned
    for step, num_micro_batches in enumerate(MICRO_BATCHES):
        if reducer is not None:
            reducer.begin_step(num_micro_batches)
        per_step = []
        for k, mb in enumerate(rows(step, dp, dp_rank).chunk(num_micro_batches)):
            (model.loss(mb, last=k == num_micro_batches - 1) / num_micro_batches).backward()
            if dtype != torch.float32:
                opt.accumulate_grads()
            if reducer is not None:
                per_step.append(reducer.launched_in_backward)
                reducer.after_backward()
        launched.append(per_step)
        opt.accumulate_grads()
        opt.grad_of(deferred).mul_(2.0)  # stands in for the tied-embedding sum across stages
        if reducer is not None:
            reducer.finish()
        else:
            opt.reduce_gradients()
        opt.step()
        opt.zero_grad()
    out = {"params": [p.detach().float().clone() for p in model.parameters()], "launched": launched}
    if reducer is not None:
        params = reducer.params
        offset_index = next(i for i, p in enumerate(params) if p is model.offset)
        deferred_index = next(i for i, p in enumerate(params) if p is deferred)
        out["num_buckets"] = len(reducer.buckets)
        out["blocked"] = sum(1 for b in reducer.buckets if offset_index in b or deferred_index in b)
        out["offset_bucket_last_regular"] = offset_index in reducer.buckets[-out["blocked"]]
    return out


def overlap_body(rank, world_size):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank creates both
    layouts = {2: (pairs[rank // 2], rank % 2), 4: (dist.group.WORLD, rank)}
    results = {}
    for dp, (group, dp_rank) in layouts.items():
        for kind in ("zero0", "zero1"):
            for dtype in (torch.float32, torch.bfloat16):
                ref = train(kind, dtype, group, dp, dp_rank, overlap=False)
                got = train(kind, dtype, group, dp, dp_rank, overlap=True)
                initial = OverlapLM().to(dtype).parameters()
                results[(dp, kind, str(dtype))] = {
                    "diff": max((a - b).abs().max().item() for a, b in zip(got["params"], ref["params"])),
                    "moved": max((a - b.float()).abs().max().item() for a, b in zip(ref["params"], initial)),
                    **{k: v for k, v in got.items() if k != "params"}}
    return results


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    return overlap_body, (), None


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return shared_4rank_run(request, tmp_path_factory, __name__)[1]


CASES = [(dp, kind, str(dtype)) for dp in (2, 4) for kind in ("zero0", "zero1")
         for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_overlapped_reduction_equals_reduction_after_backward(results, case):
    for rank, per_rank in enumerate(results):
        r = per_rank[case]
        assert r["moved"] > 1e-2, (rank, r)  # the steps changed the weights
        # dp=2 sums two numbers (commutative: bit-equal). At dp=4 the order of the four fp32 terms
        # depends on where an element sits in its bucket (gloo's ring) and on the collective
        # (ZeRO-1 reduces onto each owner instead of one reduce-scatter): rounding noise only.
        assert r["diff"] <= (1e-6 if case[0] == 4 else 0.0), (rank, r["diff"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_buckets_launch_during_the_last_backward_only(results, case):
    for rank, per_rank in enumerate(results):
        r = per_rank[case]
        three, one = r["launched"]
        assert three[:2] == [0, 0], (rank, r)  # no communication in earlier micro-batches (no_sync)
        # In the last backward every bucket before the one holding `offset` (no gradient there)
        # is launched from the hooks; that bucket and the deferred ones wait for finish().
        assert r["offset_bucket_last_regular"], (rank, r)
        expected = r["num_buckets"] - r["blocked"]
        assert expected >= 3 and three[2] == expected and one == [expected], (rank, r)


def test_flat_bucket_plan():
    # 4 params of 5, 3, 6, 2 elements (offsets 0, 5, 8, 14; 16 in all), dp=3: shards of 6, padded to 18.
    plan = plan_flat_buckets([5, 3, 6, 2], shard_numel=6, dp=3, bucket_numel=4, deferred=[False, True, False, False])
    assert plan == [(14, 18, [3]),            # padding joins the last parameter; shard 2 = [12, 18)
                    (12, 14, [2]),            # param 2 split at the shard boundary 12
                    (8, 12, [2]),             # shard 1 = [6, 12); 4 elements: the bucket is full
                    (0, 5, [0]),              # shard 0 (a param larger than a bucket goes alone)
                    (6, 8, [1]), (5, 6, [1])]  # deferred param 1, split at 6, last
    covered = sorted((a, b) for a, b, _ in plan)
    assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:])) and covered[0][0] == 0 and covered[-1][1] == 18
