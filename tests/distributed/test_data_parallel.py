"""Bucketed DP all-reduce and ZeRO-1 on real gloo processes equal single-process AdamW.

One 4-process run covers dp=2 (two independent pairs) and dp=4; every rank also trains the
single-process reference on the whole batch itself, so each comparison is local. (The 4 processes
also run other modules' bodies: see tests.engine.test_train_engine.shared_4rank_run.)
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hfrl.distributed import data_parallel
from hfrl.distributed.data_parallel import GradBucketer, ZeroOneOptimizer, allreduce_gradients
from hfrl.engine.optim import MixedPrecisionAdamW, param_groups
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from tests.engine.test_train_engine import shared_4rank_run

VOCAB, BATCH, SEQ, STEPS, LR, WD = 64, 8, 12, 3, 1e-2, 0.1
# Adam's first steps move each weight by about lr * g / (|g| + eps): for the few gradient entries
# near eps, the ~1e-9 rounding difference between a sub-batch forward and a full-batch forward
# becomes a ~lr change (5e-4 with eps=1e-8). eps=1e-4 bounds that amplification, so the 1e-6
# tolerance below still catches any real error while the weights move by ~3e-2.
EPS = 1e-4


class TinyLM(nn.Module):
    """CausalLM plus a 5-element parameter, so the flat size is not a multiple of dp (padding)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lm = CausalLM(ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                       num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                                       max_position_embeddings=64))
        self.temperature = nn.Parameter(torch.linspace(0.9, 1.1, 5))

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids) / self.temperature.mean()  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR, eps=EPS, weight_decay=WD)


def zero_one(model: nn.Module, group) -> ZeroOneOptimizer:
    return ZeroOneOptimizer(param_groups(model.parameters(), WD), group, lr=LR, eps=EPS, weight_decay=WD)


def train(model, opt, dp, dp_rank, steps, reduce=None, start=0):
    for step in range(start, start + steps):
        rows = global_batch(step).chunk(dp)[dp_rank]  # this rank's share; equal sizes, so mean of means
        model.loss(rows).backward()
        if reduce is not None:
            reduce()
        opt.step()
        opt.zero_grad()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def dp_body(rank, world_size):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank creates both
    layouts = {2: (pairs[rank // 2], rank % 2), 4: (dist.group.WORLD, rank)}
    reference = TinyLM()
    reference.loss(global_batch(0)).backward()
    ref_grads = [p.grad.clone() for p in reference.parameters()]
    reference.zero_grad()
    train(reference, adamw(reference), 1, 0, STEPS)
    moved = max_diff(reference, TinyLM())
    out = {"moved": moved}
    for dp, (group, dp_rank) in layouts.items():
        averaged = TinyLM()
        averaged.loss(global_batch(0).chunk(dp)[dp_rank]).backward()
        GradBucketer(averaged.parameters(), group, bucket_mb=0.01).allreduce()
        grad_diff = max((p.grad - g).abs().max().item() for p, g in zip(averaged.parameters(), ref_grads))
        plain = TinyLM()
        bucketer = GradBucketer(plain.parameters(), group, bucket_mb=0.01)  # ~10 KB: several buckets
        train(plain, adamw(plain), dp, dp_rank, STEPS, reduce=bucketer.allreduce)
        zero = TinyLM()
        opt = zero_one(zero, group)
        train(zero, opt, dp, dp_rank, STEPS)
        one_off = TinyLM()  # the functional form, with the default bucket size
        train(one_off, adamw(one_off), dp, dp_rank, STEPS,
              reduce=lambda: allreduce_gradients(one_off.parameters(), group))
        out[dp] = dict(grad_diff=grad_diff, num_buckets=len(bucketer.buckets),
                       first_bucket=bucketer.buckets[0][0] is list(plain.parameters())[-1],
                       plain_vs_ref=max_diff(plain, reference), zero_vs_ref=max_diff(zero, reference),
                       zero_vs_plain=max_diff(zero, plain), one_off_vs_ref=max_diff(one_off, reference),
                       padded=opt.numel % dp != 0, shard=(opt.shard_numel, opt.numel),
                       state_bytes=opt.exp_avg.numel())
    out["fallback"] = _fallback_collectives(rank, zero)  # zero: the dp=4 ZeRO-1 model, trained last
    out["resume"] = _resume(rank)
    out["bf16"] = _bf16_zero_vs_mixed(pairs[rank // 2], rank % 2)
    return out


def _fallback_collectives(rank, zero_dp4):
    """Backends without flat reduce-scatter/all-gather: all-reduce + slice, list all-gather; same result."""
    data_parallel._UNSUPPORTED.update({"reduce_scatter", "all_gather"})
    try:
        model = TinyLM()
        train(model, zero_one(model, dist.group.WORLD), 4, rank, STEPS)
    finally:
        data_parallel._UNSUPPORTED.clear()
    return max_diff(model, zero_dp4)


def _resume(rank):
    """ZeRO-1 at dp=4: 2 steps, save, 1 more step == fresh model + optimizer loaded from the save, 1 step."""
    model = TinyLM()
    opt = zero_one(model, dist.group.WORLD)
    train(model, opt, 4, rank, 2)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, 4, rank, 1, start=2)

    resumed = TinyLM(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = zero_one(resumed, dist.group.WORLD)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 4, rank, 1, start=2)

    mismatch = ""
    try:  # a dp=2 layout's shard does not load into this dp=4 optimizer
        bad = copy.deepcopy(saved_opt)
        bad["layout"]["dp"] = 2
        opt2.load_state_dict(bad)
    except ValueError as err:
        mismatch = str(err)
    return dict(diff=max_diff(model, resumed), steps=opt2.step_count, mismatch=mismatch)


def _bf16_zero_vs_mixed(group, dp_rank):
    """bf16 params at dp=2: ZeRO-1 and MixedPrecisionAdamW (both fp32 masters) give the same bf16 weights."""
    models = [TinyLM().to(torch.bfloat16) for _ in range(2)]
    zero = zero_one(models[0], group)
    mixed = MixedPrecisionAdamW(param_groups(models[1].parameters(), WD), group, lr=LR, eps=EPS,
                                weight_decay=WD)
    for model, opt in zip(models, (zero, mixed)):
        train(model, opt, 2, dp_rank, STEPS, reduce=opt.reduce_gradients)
    return dict(diff=max_diff(*models), master_dtype=zero.master_shard.dtype,
                param_dtype=models[0].lm.norm.weight.dtype, mixed_master_dtype=mixed.master_params[0].dtype)


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    return dp_body, (), None


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return shared_4rank_run(request, tmp_path_factory, __name__)[1]


@pytest.mark.parametrize("dp", [2, 4])
def test_bucketed_allreduce_equals_single_process(results, dp):
    for r in results:
        assert r["moved"] > 1e-2  # the steps changed the weights far beyond the tolerance
        assert r[dp]["grad_diff"] < 1e-7  # DP-averaged grads == full-batch grads (grads are ~1e-2)
        assert r[dp]["num_buckets"] > 1 and r[dp]["first_bucket"]  # reverse order, several buckets
        assert r[dp]["plain_vs_ref"] < 1e-6
        assert r[dp]["one_off_vs_ref"] < 1e-6


@pytest.mark.parametrize("dp", [2, 4])
def test_zero_one_equals_plain_dp_and_single_process(results, dp):
    for r in results:
        assert r[dp]["zero_vs_ref"] < 1e-6 and r[dp]["zero_vs_plain"] < 1e-6
        shard, numel = r[dp]["shard"]
        assert shard == -(-numel // dp) and r[dp]["state_bytes"] == shard  # moments only for the slice
    assert any(r[dp]["padded"] for r in results)  # the odd-sized parameter forces padding


def test_zero_one_fallback_collectives(results):
    assert all(r["fallback"] == 0.0 for r in results)


def test_zero_one_state_dict_round_trip(results):
    for r in results:
        assert r["resume"]["diff"] == 0.0 and r["resume"]["steps"] == 3
        assert "'dp': (2, 4)" in r["resume"]["mismatch"]


def test_zero_one_bf16_keeps_fp32_master(results):
    for r in results:
        assert r["bf16"]["master_dtype"] == torch.float32 and r["bf16"]["mixed_master_dtype"] == torch.float32
        assert r["bf16"]["param_dtype"] == torch.bfloat16
        assert r["bf16"]["diff"] == 0.0
