"""Optimizer config, schedules, weight-decay groups, mixed precision, global clipping, step skipping.

Multi-rank checks run in one 4-process gloo run laid out as pp=2 x tp=2 (rank = pp * 2 + tp):
TP groups {0,1} {2,3}, PP groups {0,2} {1,3}; the same 4 ranks also serve as one dp=4 group.
(The 4 processes also run other modules' bodies: see tests.engine.test_train_engine.shared_4rank_run.)
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hfrl.distributed.data_parallel import ZeroOneOptimizer
from hfrl.engine.optim import (MixedPrecisionAdamW, OptimConfig, build_optimizer, build_scheduler, clip_grad_norm,
                               clip_optimizer_grads, lr_multiplier, param_groups, should_skip_step)
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from tests.engine.test_train_engine import shared_4rank_run

VOCAB = 64


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                                max_position_embeddings=64))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(step))


# ---- config and schedules ------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(schedule="cosine", total_steps=5, warmup_steps=5), "total_steps"),
    (dict(schedule="step"), "schedule"),
    (dict(zero_stage=2), "zero_stage"),
    (dict(betas=[0.9]), "betas"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(max_consecutive_skips=-1), r"max_consecutive_skips=-1 must be an integer >= 0"),
    (dict(max_consecutive_skips=True), r"max_consecutive_skips=True"),
])
def test_config_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**changes).validate()


def _lrs(cfg: OptimConfig, zero_stage: int, steps: int) -> list[float]:
    cfg.zero_stage = zero_stage
    opt = build_optimizer(tiny_model().parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # zero grads: only the schedule matters here
        sched.step()
    return lrs


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_schedule_exact_values(zero_stage):
    base = dict(lr=1.0, warmup_steps=3, total_steps=13, min_lr_ratio=0.1, weight_decay=0.0)
    cosine = _lrs(OptimConfig(schedule="cosine", **base), zero_stage, 16)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # (s + 1) / warmup
    assert cosine[3] == pytest.approx(1.0)
    assert cosine[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert cosine[8] == pytest.approx(0.55)
    assert cosine[13:] == pytest.approx([0.1] * 3)  # held at min_lr_ratio after total_steps
    linear = _lrs(OptimConfig(schedule="linear", **base), zero_stage, 14)
    assert linear[3] == pytest.approx(1.0) and linear[5] == pytest.approx(0.1 + 0.9 * 0.8)
    assert linear[13] == pytest.approx(0.1)
    constant = _lrs(OptimConfig(schedule="constant", **base), zero_stage, 6)
    assert constant == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    assert lr_multiplier(0, OptimConfig()) == 1.0  # no warmup: full lr from the first step


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_no_weight_decay_on_1d_params(zero_stage):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, zero_stage=zero_stage)
    opt = build_optimizer(model.parameters(), cfg)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.5]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is exactly 0: only decay moves weights
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.dim() >= 2 else before[name]
        assert torch.equal(p.detach(), expected), name
    one_d = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert any("norm" in n for n in one_d) and any("bias" in n for n in one_d)


def test_param_groups_dedupe_tied_and_frozen():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)
    groups = param_groups([a, b, a, frozen], 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]


# ---- mixed precision ------------------------------------------------------------------------------

def _bf16_grads(step: int, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]


@pytest.mark.parametrize("kind", ["mixed", "zero"])
def test_mixed_precision_master_matches_fp32_adamw(kind):
    """Same (bf16-representable) grads: fp32 masters follow fp32 AdamW bit for bit; params are their bf16."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(7, 5).to(torch.bfloat16)), nn.Parameter(torch.randn(5).to(torch.bfloat16))]
    params[0].hfrl_shard, params[0].hfrl_replicated_rows = "column", (3, 5, 2)
    reference = [nn.Parameter(p.detach().float()) for p in params]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups(reference), lr=1e-2)
    cls = MixedPrecisionAdamW if kind == "mixed" else ZeroOneOptimizer
    opt = cls(groups(params), None, lr=1e-2)
    for step in range(3):
        grads = _bf16_grads(step, params)
        for p, r, g in zip(params, reference, grads):
            half = g * 0.5  # two micro-batches; their sum is exact in fp32, not necessarily in bf16
            p.grad = half.clone()
            opt.accumulate_grads()
            assert p.grad is None  # moved into the fp32 master gradient
            p.grad = half.clone()
            r.grad = half.float() + half.float()
        opt.reduce_gradients()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    masters = opt.master_params if kind == "mixed" else [opt.master_shard[:35].view(7, 5), opt.master_shard[35:]]
    for p, m, r in zip(params, masters, reference):
        assert m.dtype == torch.float32 and p.dtype == torch.bfloat16
        assert torch.equal(m, r.detach())
        assert torch.equal(p.detach(), r.detach().to(torch.bfloat16))
    tagged = opt.master_params  # ZeRO: flat views, one per parameter here (dp = 1)
    assert tagged[0].hfrl_shard == "column" and not hasattr(tagged[1], "hfrl_shard")  # TP tags follow
    if kind == "mixed":
        assert masters[0].hfrl_replicated_rows == (3, 5, 2)
    else:  # the flat view of rows 3:5 of a (7, 5) param: elements 15:25
        assert opt.master_params[0].hfrl_replicated_rows == (15, 25, 2)
    if kind == "mixed":  # the checkpoint carries the fp32 masters
        state = opt.state_dict()
        assert sorted(state["master_params"]) == [0, 1] and state["master_params"][0].dtype == torch.float32


def test_mixed_precision_model_tracks_fp32_training():
    """A bf16 model trained with MixedPrecisionAdamW stays within bf16 precision of the fp32 run."""
    fp32 = tiny_model()
    bf16 = tiny_model().to(torch.bfloat16)
    with torch.no_grad():  # start both from the same (bf16-representable) weights
        for p, q in zip(fp32.parameters(), bf16.parameters()):
            p.copy_(q)
    start = [p.detach().clone() for p in fp32.parameters()]
    cfg = OptimConfig(lr=1e-3, weight_decay=0.0)
    opts = [build_optimizer(m.parameters(), cfg) for m in (fp32, bf16)]
    assert opts[0].master_params[0] is list(fp32.parameters())[0]  # fp32: no copy, the no-op path
    for step in range(3):
        for model, opt in zip((fp32, bf16), opts):
            lm_loss(model, batch(step)).backward()
            opt.reduce_gradients()
            opt.step()
            opt.zero_grad()
    masters = opts[1].master_params
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(fp32.parameters(), start)]).norm()
    # master_params follow the optimizer's group order (decay, then no decay), the same for both runs
    gap = torch.cat([(m - p.detach()).flatten() for m, p in zip(masters, opts[0].master_params)]).norm()
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert moved > 0.05 and gap < 0.1 * moved  # bf16 forward/backward noise only


# ---- clipping, single process ---------------------------------------------------------------------

def test_clip_grad_norm_single_process_matches_torch():
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    params[0].hfrl_shard = "column"  # tags do not matter without a TP group
    grads = [torch.randn(4, 3) * 3, torch.randn(5)]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    for p, r, g in zip(params, reference, grads):
        p.grad, r.grad = g.clone(), g.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert clip_grad_norm(params, 1.0) == pytest.approx(float(expected), rel=1e-6)
    for p, r in zip(params, reference):
        assert torch.allclose(p.grad, r.grad, rtol=1e-6, atol=0)
    norm_only = clip_grad_norm(params, 0.0)  # 0 = off: report the norm, leave the grads
    assert norm_only == pytest.approx(1.0, rel=1e-5)


def test_should_skip_step_single_process():
    assert should_skip_step(3.0, True) is False
    assert should_skip_step(float("inf"), True) is True
    assert should_skip_step(float("nan"), True) is True
    with pytest.raises(FloatingPointError, match="skip_nonfinite"):
        should_skip_step(float("nan"), False)


# ---- multi-rank: TP/PP clipping, clipped DP/ZeRO training, skip decisions ---------------------------

# Full "model": name -> (shape, TP split dim or None for replicated, tag, PP stage). Split "qkv" is
# a fused q/k/v with one kv head and tp=2: rank r holds q rows [2r, 2r+2) plus the shared kv rows 4:6.
FULL = {
    "embed": ((10, 6), 0, "vocab", 0),
    "l0.col": ((8, 6), 0, "column", 0), "l0.row": ((6, 8), 1, "row", 0), "l0.norm": ((6,), None, None, 0),
    "l0.bias": ((6,), None, None, 0),
    "l1.qkv": ((6, 5), "qkv", "column", 1), "l1.qkv_bias": ((6,), "qkv", "column", 1),
    "l1.col": ((8, 6), 0, "column", 1), "l1.row": ((6, 8), 1, "row", 1), "l1.norm": ((6,), None, None, 1),
    "head": ((10, 6), 0, "vocab", 1),
}


def _tp_slice(t, dim, tp_rank):
    if dim is None:
        return t
    if dim == "qkv":
        return torch.cat([t[2 * tp_rank:2 * tp_rank + 2], t[4:6]])
    return t.chunk(2, dim)[tp_rank]


def _full_params():
    gen = torch.Generator().manual_seed(7)
    params = {}
    for name, (shape, _, _, _) in FULL.items():
        p = nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen)
        params[name] = p
    return params


def _local_params(full, tp_rank, pp_rank=None):
    """This rank's stage (all stages for None), TP-sliced and tagged like the TP layers tag them."""
    local = {}
    for name, (_, dim, tag, stage) in FULL.items():
        if pp_rank is not None and stage != pp_rank:
            continue
        q = nn.Parameter(_tp_slice(full[name].detach(), dim, tp_rank).clone())
        q.grad = _tp_slice(full[name].grad, dim, tp_rank).clone()
        if tag is not None:
            q.hfrl_shard = tag
        if dim == "qkv":
            q.hfrl_replicated_rows = (2, 4, 2)  # local rows 2:4 are held alike by 2 TP ranks
        local[name] = q
    return local


def _tp_pp_clip(rank, tp_group, pp_group):
    tp_rank, pp_rank = rank % 2, rank // 2
    out = {}
    for max_norm in (1.0, 1e6, 0.0):
        full = _full_params()
        expected = float(torch.nn.utils.clip_grad_norm_(list(full.values()), max_norm)) if max_norm else \
            float(torch.nn.utils.get_total_norm([p.grad for p in full.values()]))
        local = _local_params(_full_params(), tp_rank, pp_rank)
        norm = clip_grad_norm(local.values(), max_norm, tp_group, pp_group)
        grad_diff = max((q.grad - _tp_slice(full[name].grad, FULL[name][1], tp_rank)).abs().max().item()
                        for name, q in local.items())
        out[max_norm] = (norm, expected, grad_diff)
    return out


def _zero_tp_clip(rank, tp_group, dp_group):
    """ZeRO-1 at dp=2 x tp=2, whole model on each rank: the flat shards' views keep the TP tags."""
    full = _full_params()
    expected = float(torch.nn.utils.clip_grad_norm_(list(full.values()), 1.0))
    local = _local_params(_full_params(), rank % 2)
    opt = ZeroOneOptimizer(list(local.values()), dp_group, lr=1e-2)
    opt.reduce_gradients()  # both DP ranks hold the same grads, so the average is that grad
    before = opt.grad_shard.clone()
    norm = clip_optimizer_grads(opt, 1.0, tp_group)
    scale_diff = (opt.grad_shard - before * (1.0 / (norm + 1e-6))).abs().max().item()
    tagged = sum(hasattr(v, "hfrl_replicated_rows") for v in opt.master_params)
    return norm, expected, scale_diff, tagged


def _clipped_training(rank, zero_stage):
    """dp=4 with clipping (norm ~1, max_norm 0.5) == single process with torch clip_grad_norm_ + AdamW."""
    cfg = OptimConfig(lr=1e-2, eps=1e-4, weight_decay=0.1, grad_clip=0.5, zero_stage=zero_stage)
    reference, model = tiny_model(), tiny_model()
    ref_opt = torch.optim.AdamW(param_groups(reference.parameters(), 0.1), lr=1e-2, eps=1e-4, weight_decay=0.1)
    opt = build_optimizer(model.parameters(), cfg, dp_group=dist.group.WORLD)
    norms = []
    for step in range(3):
        lm_loss(reference, batch(step)).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip))
        ref_opt.step()
        ref_opt.zero_grad()
        lm_loss(model, batch(step).chunk(4)[rank]).backward()
        opt.reduce_gradients()
        norms.append((clip_optimizer_grads(opt, cfg.grad_clip), ref_norm))
        opt.step()
        opt.zero_grad()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    return norms, diff


def _nonfinite(rank, tp_group, pp_group):
    out = {}
    # The decision: rank 3 alone sees inf; max over TP then PP reaches every rank.
    out["one_inf"] = should_skip_step(float("inf") if rank == 3 else 1.0, True, (tp_group, pp_group))
    out["all_finite"] = should_skip_step(1.0, True, (tp_group, pp_group))
    try:
        should_skip_step(float("nan") if rank == 2 else 1.0, False, (tp_group, pp_group))
        out["raised"] = False
    except FloatingPointError:
        out["raised"] = True
    # The whole step, for both ZeRO stages at dp=4: rank 1 gets an inf gradient entry.
    for zero_stage in (0, 1):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        cfg = OptimConfig(lr=1e-2, zero_stage=zero_stage)
        opt = build_optimizer(model.parameters(), cfg, dp_group=dist.group.WORLD)
        lm_loss(model, batch(0).chunk(4)[rank]).backward()
        if rank == 1:
            model.lm_head.weight.grad[3, 5] = float("inf")
        opt.reduce_gradients()
        norm = clip_optimizer_grads(opt, cfg.grad_clip)
        skip = should_skip_step(norm, cfg.skip_nonfinite, (dist.group.WORLD,))
        if not skip:
            opt.step()
        opt.zero_grad()
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        out[f"zero{zero_stage}"] = (math.isfinite(norm), skip, unchanged)
    return out


def optim_body(rank, world_size):
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp_group, pp_group = tp_groups[rank // 2], pp_groups[rank % 2]
    return {"clip": _tp_pp_clip(rank, tp_group, pp_group), "zero_tp": _zero_tp_clip(rank, tp_group, pp_group),
            "train0": _clipped_training(rank, 0), "train1": _clipped_training(rank, 1),
            "nonfinite": _nonfinite(rank, tp_group, pp_group)}


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    return optim_body, (), None


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return shared_4rank_run(request, tmp_path_factory, __name__)[1]


@pytest.mark.parametrize("max_norm", [1.0, 1e6, 0.0])
def test_clip_over_tp_and_pp_matches_single_process(results, max_norm):
    norms = {r["clip"][max_norm][0] for r in results}
    assert len(norms) == 1  # bitwise the same on every rank
    for r in results:
        norm, expected, grad_diff = r["clip"][max_norm]
        assert norm == pytest.approx(expected, rel=1e-6)
        assert grad_diff < 1e-6  # each local grad is the matching slice of the clipped full grad
    if max_norm == 1.0:
        assert results[0]["clip"][1.0][1] > 2.0  # the clipping really scaled the grads down


def test_zero_one_shards_clip_with_tp_tags(results):
    for r in results:  # the pp groups {0,2} {1,3} serve as DP groups here
        norm, expected, scale_diff, _ = r["zero_tp"]
        assert norm == pytest.approx(expected, rel=1e-6) and scale_diff < 1e-7
    assert sum(r["zero_tp"][3] for r in results) >= 1  # replicated rows reached some shard's views


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_clipped_dp_training_matches_single_process(results, zero_stage):
    for r in results:
        norms, diff = r[f"train{zero_stage}"]
        for norm, ref_norm in norms:
            assert ref_norm > 0.5 and norm == pytest.approx(ref_norm, rel=1e-5)
        assert diff < 1e-6
    assert len({tuple(n for n, _ in r[f"train{zero_stage}"][0]) for r in results}) == 1


def test_nonfinite_skip_is_consistent_on_all_ranks(results):
    for r in results:
        nf = r["nonfinite"]
        assert nf["one_inf"] is True and nf["all_finite"] is False and nf["raised"] is True
        for zero_stage in (0, 1):
            finite, skip, unchanged = nf[f"zero{zero_stage}"]
            assert not finite and skip and unchanged
