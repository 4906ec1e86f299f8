"""Pipeline parallelism against the single-process model, on real gloo processes.

One set of 4 processes runs every multi-rank check (start-up dominates the cost; the processes also
run other modules' bodies: see tests.engine.test_train_engine.shared_4rank_run): first a pipeline
of 4 stages, then two pipelines of 2 stages (pp=2 x dp=2, stages on global ranks 0-2 and 1-3).
Each rank loads its stage from a HF checkpoint with ``from_pretrained(..., layer_range=...)`` and
the full model from the same checkpoint, and reports max abs differences; the tests assert on them.
Last, a pipeline of 3 stages on ranks 0-2 (rank 3 only helps create the groups) is given
mismatched micro-batches. Only the ``python -O`` check needs processes of its own.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.distributed.pipeline_parallel import (MODEL_INPUT_KEYS, PipelineSchedule, partition_layers,
                                                pipeline_ops)
from hfrl.models import weights
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from tests.engine.test_train_engine import shared_4rank_run
from tests.multiproc import run_ranks

TOL = 1e-5
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
PP4_RUNS = [("1f1b", 6), ("gpipe", 4), ("1f1b", 2)]  # 2 micro-batches < 4 stages: warmup is clamped
PP2_RUNS = [("1f1b", 4), ("gpipe", 4)]


# ---- data, loss and helpers (module level: the spawned ranks import them) -----------------------

def save_checkpoint(path, tie: bool) -> str:
    # imported here: the spawned ranks (python -O ones too) import this module but build no checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # default ones: make them matter
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return str(path)


def padded(seed: int, B: int, T: int, left: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, T), generator=g)
    lengths = [T] + torch.randint(2, T + 1, (B - 1,), generator=g).tolist()
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, T - n:] = 1
        else:
            mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def packed(seed: int, lengths: list[int]) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "cu_seqlens": cu}


def micro_batches(seed: int, num: int) -> list[dict]:
    """Ragged micro-batches: right/left padding, no padding, packed, each with its own T."""
    makers = [lambda s: padded(s, 3, 9), lambda s: padded(s, 2, 5, left=True),
              lambda s: {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(s))},
              lambda s: packed(s, [5, 4, 6]), lambda s: padded(s, 1, 7), lambda s: padded(s, 4, 3, left=True)]
    return [makers[i % len(makers)](seed + i) for i in range(num)]


def label_mask(mb: dict) -> torch.Tensor:
    """(B, T-1): 1 where position t predicts a real token t+1 of the same sequence."""
    ids = mb["input_ids"]
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1)
    if "attention_mask" in mb:
        mask = (mb["attention_mask"][:, 1:] * mb["attention_mask"][:, :-1]).float()
    if "cu_seqlens" in mb:
        for start in mb["cu_seqlens"][1:-1].tolist():
            mask[0, start - 1] = 0
    return mask


def token_ce(logits: torch.Tensor, mb: dict):
    """Token-level next-token cross-entropy, mean over the micro-batch's real tokens."""
    labels, mask = mb["input_ids"][:, 1:], label_mask(mb)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    loss = (ce * mask).sum() / mask.sum()
    return loss, {"ce": loss.detach(), "num_tokens": mask.sum()}


def next_token_log_probs(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    return logits[:, :-1].log_softmax(-1).gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)  # (B, T-1)


def full_forward(model, mb: dict) -> torch.Tensor:
    return model(mb["input_ids"], **{k: mb[k] for k in MODEL_INPUT_KEYS if k in mb})


def global_name(name: str, offset: int, full_names) -> str:
    if name == "lm_head.weight" and name not in full_names:  # tied: the full model holds it once
        return "embed_tokens.weight"
    if name.startswith("layers."):
        _, j, rest = name.split(".", 2)
        return f"layers.{int(j) + offset}.{rest}"
    return name


def max_grad_diff(stage_model, full_model) -> tuple[float, int]:
    full = dict(full_model.named_parameters())
    diffs = [(p.grad - full[global_name(n, stage_model.layer_offset, full)].grad).abs().max().item()
             for n, p in stage_model.named_parameters()]
    return max(diffs), len(diffs)


# ---- the body every rank runs -------------------------------------------------------------------

def load_stage(path: str, groups):
    full = weights.from_pretrained(path)
    layer_range = partition_layers(full.config.num_layers, groups.dims.pp)[groups.coord.pp]
    return full, weights.from_pretrained(path, layer_range=layer_range)


def check_forward(groups, full, model, seed: int) -> dict:
    mbs = micro_batches(seed, 6)
    out = {}
    for name, fn in (("log_probs", next_token_log_probs), ("logits", None)):
        got = PipelineSchedule.from_groups(model, groups).forward_only(mbs, fn)
        if groups.coord.pp < groups.dims.pp - 1:
            assert got is None
            continue
        with torch.no_grad():
            expected = [full_forward(full, mb) for mb in mbs]
            expected = [fn(e, mb) if fn else e for e, mb in zip(expected, mbs)]
        assert [g.shape for g in got] == [e.shape for e in expected]
        out[name] = max((g - e).abs().max().item() for g, e in zip(got, expected))
    return out


def check_train(groups, full, model, schedule: str, num: int, seed: int) -> dict:
    mbs = micro_batches(seed, num)
    model.zero_grad(set_to_none=True)
    full.zero_grad(set_to_none=True)
    sched = PipelineSchedule.from_groups(model, groups, schedule=schedule)
    result = sched.train_step(mbs, token_ce)
    per_mb = [token_ce(full_forward(full, mb), mb) for mb in mbs]
    (sum(loss for loss, _ in per_mb) / num).backward()
    per_mb = [(loss.detach(), metrics) for loss, metrics in per_mb]
    ref_metrics = {k: sum(float(m[k]) for _, m in per_mb) / num for k in per_mb[0][1]}
    grad_diff, num_grads = max_grad_diff(model, full)
    return {"loss": result.loss, "ref_loss": sum(loss.item() for loss, _ in per_mb) / num,
            "metrics": result.metrics, "ref_metrics": ref_metrics, "grad_diff": grad_diff,
            "num_grads": num_grads, "ops": sched.executed_ops}


def check_tied(groups, path: str, seed: int) -> dict:
    full, model = load_stage(path, groups)
    full.zero_grad(set_to_none=True)
    sched = PipelineSchedule.from_groups(model, groups)
    mbs = micro_batches(seed, 4)
    sched.train_step(mbs, token_ce)
    (sum(token_ce(full_forward(full, mb), mb)[0] for mb in mbs) / 4).backward()
    tied = model.embed_tokens if groups.coord.pp == 0 else model.lm_head
    before = (tied.weight.grad - full.embed_tokens.weight.grad).abs().max().item()
    sched.sync_tied_embedding_grads()
    after = (tied.weight.grad - full.embed_tokens.weight.grad).abs().max().item()
    return {"before": before, "after": after, "all_grads": max_grad_diff(model, full)[0]}


MISMATCHES = {
    # the last stage is given 3 of the 4 micro-batches
    "count": lambda mbs, last: mbs[:3] if last else mbs,
    # same count and same token total, but micro-batch 0 is (9, 3) instead of (3, 9) there
    "shape": lambda mbs, last: [{"input_ids": mbs[0]["input_ids"].reshape(9, 3)}, *mbs[1:]] if last else mbs,
    # the same micro-batches in another order: every total agrees, the per-position shapes do not
    "order": lambda mbs, last: mbs[::-1] if last else mbs,
    # none at all on the last stage: it must not raise alone, before the agreement
    "empty": lambda mbs, last: [] if last else mbs,
}


def mismatch_body(rank, world_size, path: str | None, pp: int | None = None) -> dict | None:
    """Each MISMATCHES case through forward_only and train_step; the error message per case, per call.

    A pipeline of ``pp`` stages (default: the whole world) on global ranks 0..pp-1; other ranks only
    take part in creating the groups and return None. The stages load from the checkpoint at
    ``path``, or, when it is None, are built from TINY with random weights (no transformers import:
    the ``python -O`` ranks would compile it from source).
    """
    pp = pp or world_size
    groups = build_groups("actor", ParallelDims(pp=pp), tuple(range(pp)), rank, GroupCache())
    if rank >= pp:
        return None
    layer_range = partition_layers(TINY["num_hidden_layers"], pp)[groups.coord.pp]
    if path is None:
        torch.manual_seed(0)
        model = CausalLM(ModelConfig(vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                                     intermediate_size=TINY["intermediate_size"],
                                     num_layers=TINY["num_hidden_layers"], num_heads=TINY["num_attention_heads"],
                                     num_kv_heads=TINY["num_key_value_heads"],
                                     max_position_embeddings=TINY["max_position_embeddings"],
                                     rms_norm_eps=TINY["rms_norm_eps"]), layer_range)
    else:
        model = weights.from_pretrained(path, layer_range=layer_range)
    sched = PipelineSchedule.from_groups(model, groups)
    last = groups.coord.pp == pp - 1
    out = {"optimize": sys.flags.optimize}
    for case, edit in MISMATCHES.items():
        mbs = edit([{"input_ids": mb["input_ids"]} for mb in micro_batches(0, 4)], last)
        for call in ("forward_only", "train_step"):
            try:
                if call == "forward_only":
                    sched.forward_only(mbs)
                else:
                    sched.train_step(mbs, lambda logits, mb: (logits.float().mean(), {}))
                out[case, call] = "no error"
            except ValueError as err:
                out[case, call] = f"ValueError: {err}"
    # Equal micro-batches, but the last stage is given 3 loss scales for 4 micro-batches: every
    # stage must raise (that one with the reason), none may wait for a transfer.
    mbs = [{"input_ids": mb["input_ids"]} for mb in micro_batches(0, 4)]
    try:
        sched.train_step(mbs, lambda logits, mb: (logits.float().mean(), {}),
                         loss_scales=[0.25] * (3 if last else 4))
        out["scales"] = "no error"
    except ValueError as err:
        out["scales"] = f"ValueError: {err}"
    return out


def pipeline_body(rank, world_size, path: str, tied_path: str) -> dict:
    report = {}
    for name, dims, runs in (("pp4", ParallelDims(pp=4), PP4_RUNS), ("pp2", ParallelDims(pp=2, dp=2), PP2_RUNS)):
        groups = build_groups("actor", dims, tuple(range(world_size)), rank, GroupCache())
        full, model = load_stage(path, groups)
        seed = 1000 * groups.coord.dp  # each pipeline replica gets its own data
        stage = {"stage": groups.coord.pp, "forward": check_forward(groups, full, model, seed)}
        for schedule, num in runs:
            stage[f"{schedule}-{num}"] = check_train(groups, full, model, schedule, num, seed + 100)
        if name == "pp2":
            stage["tied"] = check_tied(groups, tied_path, seed + 200)
        report[name] = stage
    report["mismatch"] = mismatch_body(rank, world_size, path, pp=3)
    return report


_checkpoints: list[str] = []


def make_checkpoints(tmp_path_factory) -> tuple[str, str]:
    """(untied, tied) checkpoint folders, made once: the shared 4-rank run may need them first."""
    if not _checkpoints:
        _checkpoints.extend((save_checkpoint(tmp_path_factory.mktemp("untied"), tie=False),
                             save_checkpoint(tmp_path_factory.mktemp("tied"), tie=True)))
    return tuple(_checkpoints)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory)


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    return pipeline_body, make_checkpoints(tmp_path_factory), None


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    return shared_4rank_run(request, tmp_path_factory, __name__)[1]


def last_stages(report, layout):
    return [r[layout] for r in report if r[layout]["stage"] == {"pp4": 3, "pp2": 1}[layout]]


# ---- multi-rank tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["pp4", "pp2"])
def test_forward_only_matches_full_model(report, layout):
    lasts = last_stages(report, layout)
    assert len(lasts) == {"pp4": 1, "pp2": 2}[layout]
    for last in lasts:
        assert last["forward"]["log_probs"] < TOL and last["forward"]["logits"] < TOL, last["forward"]


@pytest.mark.parametrize("layout,run", [("pp4", f"{s}-{n}") for s, n in PP4_RUNS]
                         + [("pp2", f"{s}-{n}") for s, n in PP2_RUNS])
def test_training_matches_full_model(report, layout, run):
    stages = sorted(r[layout]["stage"] for r in report)
    assert stages == ([0, 1, 2, 3] if layout == "pp4" else [0, 0, 1, 1])
    for rank_report in report:
        got = rank_report[layout][run]
        assert got["num_grads"] > 0
        assert got["grad_diff"] < TOL, (rank_report[layout]["stage"], got["grad_diff"])
        # broadcast: every stage reports the last stage's loss and metrics
        assert abs(got["loss"] - got["ref_loss"]) < TOL
        assert got["metrics"].keys() == got["ref_metrics"].keys()
        for key, value in got["ref_metrics"].items():
            assert abs(got["metrics"][key] - value) < TOL * max(1.0, abs(value)), key


def test_1f1b_op_order_pp4(report):
    by_stage = {r["pp4"]["stage"]: r["pp4"]["1f1b-6"]["ops"] for r in report}
    F_, B_ = (lambda i: ("F", i)), (lambda i: ("B", i))
    # stage 0: 3 warmup forwards, then alternate forward/backward, then the remaining backwards
    assert by_stage[0] == [F_(0), F_(1), F_(2), F_(3), B_(0), F_(4), B_(1), F_(5), B_(2), B_(3), B_(4), B_(5)]
    assert by_stage[3] == [op for i in range(6) for op in (F_(i), B_(i))]
    for stage, ops in by_stage.items():
        assert ops == pipeline_ops("1f1b", 4, stage, 6)
        assert ops.index(("B", 0)) == 4 - stage  # warmup (pp - stage - 1) + the first steady forward
        in_flight = [sum(1 if op == "F" else -1 for op, _ in ops[:k + 1]) for k in range(len(ops))]
        assert max(in_flight) == 4 - stage  # activations held at once
    gpipe = {r["pp4"]["stage"]: r["pp4"]["gpipe-4"]["ops"] for r in report}
    assert all(ops == [F_(i) for i in range(4)] + [B_(i) for i in range(4)] for ops in gpipe.values())


def test_tied_embedding_grads_synced(report):
    for rank_report in report:
        tied = rank_report["pp2"]["tied"]
        assert tied["before"] > 1e-3  # each end alone misses the other's share
        assert tied["after"] < TOL and tied["all_grads"] < TOL, tied


def _check_mismatch_report(report):
    for case in MISMATCHES:
        for call in ("forward_only", "train_step"):
            messages = [rank_report[case, call] for rank_report in report]
            # every stage raises, and the same error: no stage is left waiting for a transfer
            assert all(m.startswith("ValueError: ") and "stages disagree" in m for m in messages), (case, messages)
            assert len(set(messages)) == 1, (case, call, messages)
    assert all(r["scales"].startswith("ValueError: ") for r in report), [r["scales"] for r in report]
    assert "3 loss scales for 4 micro-batches" in report[-1]["scales"]
    assert "micro-batch 0" in report[0]["shape", "forward_only"], report[0]["shape", "forward_only"]
    assert "(9, 3)" in report[0]["shape", "forward_only"] and "(3, 9)" in report[0]["shape", "forward_only"]
    assert "4 micro-batches" in report[0]["count", "forward_only"] and "3 micro-batches" in report[0]["count", "forward_only"]


def test_mismatched_micro_batches_fail_on_every_stage(report):
    assert report[3]["mismatch"] is None  # not a stage of the pp=3 pipeline
    _check_mismatch_report([r["mismatch"] for r in report[:3]])


def test_mismatched_micro_batches_fail_under_python_O(monkeypatch):
    """The check must not be an assert: under ``python -O`` it would vanish and the stages hang.

    The ranks are spawned from here with PYTHONOPTIMIZE=1 in their environment: the same
    interpreter flag as ``python -O``, without a ``python -O`` parent process in between.
    """
    monkeypatch.setenv("PYTHONOPTIMIZE", "1")
    report = run_ranks(2, mismatch_body, None, init=True, timeout=150)
    assert [r["optimize"] for r in report] == [1, 1]  # asserts are stripped on every rank
    _check_mismatch_report(report)


# ---- single-process tests -----------------------------------------------------------------------

@pytest.mark.parametrize("num_layers,pp,expected", [
    (4, 1, [4]), (4, 2, [2, 2]), (4, 3, [1, 2, 1]), (4, 4, [1, 1, 1, 1]), (5, 2, [3, 2]),
    (7, 4, [2, 2, 2, 1]), (10, 4, [2, 3, 3, 2]), (32, 3, [11, 11, 10]), (30, 4, [7, 8, 8, 7]),
])
def test_partition_layers(num_layers, pp, expected):
    bounds = partition_layers(num_layers, pp)
    assert [b - a for a, b in bounds] == expected
    assert bounds[0][0] == 0 and bounds[-1][1] == num_layers
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(pp - 1))


def test_partition_layers_errors():
    with pytest.raises(ValueError, match=r"pp=5 pipeline stages but the model has 4 layers"):
        partition_layers(4, 5)
    with pytest.raises(ValueError, match="positive integer"):
        partition_layers(4, 0)


def test_pipeline_ops_clamps_warmup_and_rejects_unknown_schedule():
    assert pipeline_ops("1f1b", 4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert pipeline_ops("1f1b", 1, 0, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        pipeline_ops("zb", 2, 0, 2)


def test_single_stage_schedule_matches_plain_backward(checkpoints):
    """pp=1 needs no process group: the same schedule object is the engine's plain loop."""
    model, ref = weights.from_pretrained(checkpoints[0]), weights.from_pretrained(checkpoints[0])
    mbs = micro_batches(7, 3)
    scales = [0.5, 0.3, 0.2]
    sched = PipelineSchedule(model, schedule="gpipe")
    result = sched.train_step(mbs, token_ce, scales)
    ref_loss = sum(s * token_ce(full_forward(ref, mb), mb)[0] for s, mb in zip(scales, mbs))
    ref_loss.backward()
    assert abs(result.loss - ref_loss.item()) < TOL
    assert max_grad_diff(model, ref)[0] < TOL
    outputs = sched.forward_only(mbs, next_token_log_probs)
    with torch.no_grad():
        assert all((o - next_token_log_probs(full_forward(ref, mb), mb)).abs().max() < TOL
                   for o, mb in zip(outputs, mbs))


def test_user_errors(checkpoints):
    model = weights.from_pretrained(checkpoints[0])
    mbs = micro_batches(0, 2)
    sched = PipelineSchedule(model)
    with pytest.raises(ValueError, match="got 3 loss scales for 2 micro-batches"):
        sched.train_step(mbs, token_ce, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no micro-batches"):
        sched.forward_only([])
    with pytest.raises(ValueError, match="scalar tensor"):
        sched.train_step(mbs, lambda logits, mb: (logits.mean(-1), {}))
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        PipelineSchedule(model, schedule="interleaved")
    with pytest.raises(ValueError, match="global rank of every stage"):
        PipelineSchedule(model, stage=0, num_stages=2)
