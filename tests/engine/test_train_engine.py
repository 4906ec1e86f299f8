"""TrainEngine on real gloo processes against a single-process reference step.

The parent saves tiny HF checkpoints (a tied Llama with vocab 101, padded to 102 at tp=2, and a
Llama critic), runs the reference step (hfrl model loaded from HF, plain torch AdamW, torch's
clip_grad_norm_, the whole batch in one piece) and hands the results to one 4-process run (whose
processes also run other modules' bodies: see shared_4rank_run). Each rank then trains every layout
below for one step on its DP share of the same batch (DP ranks hold different token counts) and
reports differences; the tests assert on them. Adam's eps is 1e-4:
with 1e-8 Adam turns 1e-9 gradient rounding into visible weight differences (see test_optim).

Error cases covered elsewhere (not repeated here): shape mismatch and missing shard file when
loading (tests/models/test_weights.py), tp not dividing the heads (tests/models/test_parallelize.py),
unsupported architectures (tests/models/test_config.py). Here: the same errors through the engine.
"""
import importlib
import io
import json
import logging

import pytest
import torch

from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, RoleGroups, build_groups
from hfrl.engine.optim import OptimConfig, param_groups
from hfrl.engine.train_engine import EngineConfig, TrainEngine, target_mask
from hfrl.models import weights
from tests.multiproc import run_ranks

TOL = 1e-5
VOCAB = 101
B, T = 8, 12
OPTIM = dict(lr=1e-2, eps=1e-4, weight_decay=0.1, grad_clip=0.5)
# name -> (layout, engine overrides, value model?)
NO_OVERLAP, OVERLAP = dict(overlap_grad_reduce=False), dict(overlap_grad_reduce=True)
LAYOUTS = {
    "tp2_dp2": (dict(tp=2), dict(num_micro_batches=2, **NO_OVERLAP), False),
    "tp2_dp2_zero1": (dict(tp=2), dict(num_micro_batches=2, zero_stage=1, **NO_OVERLAP), False),
    "pp2_tp2_ckpt": (dict(pp=2, tp=2), dict(num_micro_batches=3, activation_checkpointing=True), False),
    "pp2_dp2_count": (dict(pp=2), dict(num_micro_batches=2, pp_schedule="gpipe", **NO_OVERLAP), False),
    "pp2_dp2_budget": (dict(pp=2), dict(max_tokens_per_micro_batch=16, pack_sequences=True), False),
    "pp2_dp2_zero1": (dict(pp=2), dict(num_micro_batches=2, zero_stage=1, **NO_OVERLAP), False),
    "dp4_zero1": (dict(), dict(max_tokens_per_micro_batch=10, zero_stage=1, **NO_OVERLAP), False),
    "value_pp2_tp2": (dict(pp=2, tp=2), dict(num_micro_batches=2), True),
    # DP reduction overlapped with backward: each equals its NO_OVERLAP twin above bit for bit
    # (dp=2 sums two terms) or to rounding (dp=4), and launches its buckets during backward.
    "tp2_dp2_overlap": (dict(tp=2), dict(num_micro_batches=2, **OVERLAP), False),
    "tp2_dp2_zero1_overlap": (dict(tp=2), dict(num_micro_batches=2, zero_stage=1, **OVERLAP), False),
    "pp2_dp2_count_overlap": (dict(pp=2), dict(num_micro_batches=2, pp_schedule="gpipe", **OVERLAP), False),
    "pp2_dp2_zero1_overlap": (dict(pp=2), dict(num_micro_batches=2, zero_stage=1, **OVERLAP), False),
    "dp4_zero1_overlap": (dict(), dict(max_tokens_per_micro_batch=10, zero_stage=1, **OVERLAP), False),
}
OVERLAP_PAIRS = [(name.removesuffix("_overlap"), name) for name in LAYOUTS if name.endswith("_overlap")]


# ---- data, losses, reference (module level: the spawned ranks import them) ---------------------------


def global_batch(seed: int = 3) -> dict:
    """8 rows of different lengths, even rows right-padded, odd rows left-padded, plus RL-style extras."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, n in enumerate([12, 5, 9, 3, 12, 7, 10, 4]):
        if row % 2:
            mask[row, T - n:] = 1
        else:
            mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "advantages": torch.randn(B, T, generator=g),
            "returns": torch.randn(B, T, generator=g)}


def dp_share(batch: dict, dp: int, dp_rank: int) -> dict:
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    return {k: v[rows] for k, v in batch.items()}


def policy_loss(engine):
    """Advantage-weighted log-likelihood with an entropy bonus: a policy-gradient loss in a few lines."""
    def loss_fn(logits, mb):
        log_probs = engine.token_log_probs(logits, mb["input_ids"])  # (B, T-1)
        entropy = engine.token_entropy(logits)  # (B, T-1)
        mask = mb["loss_mask"][:, 1:].float()
        n = mask.sum()
        loss = -(log_probs * mb["advantages"][:, 1:] * mask).sum() / n - 0.01 * (entropy * mask).sum() / n
        return loss, {"entropy": (entropy * mask).sum() / n}
    return loss_fn


def value_loss(values, mb):
    mask = mb["loss_mask"].float()
    return ((values - mb["returns"]) ** 2 * mask).sum() / mask.sum(), {}


def reference_step(path: str, value_head: bool, batch: dict) -> dict:
    """Single process, whole batch, plain torch AdamW."""
    model = weights.from_pretrained(path, value_head)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(ids, attention_mask=mask)
    loss_mask = target_mask(mask)
    if value_head:
        values = out * mask
        loss = ((out - batch["returns"]) ** 2 * loss_mask).sum() / loss_mask.sum()
    else:
        log_p = torch.log_softmax(out[:, :-1], -1)
        log_probs = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        m = loss_mask[:, 1:].float()
        loss = -(log_probs * batch["advantages"][:, 1:] * m).sum() / m.sum() - 0.01 * (entropy * m).sum() / m.sum()
        values = log_probs.detach() * (mask[:, 1:] * mask[:, :-1])
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
    opt = torch.optim.AdamW(param_groups(model.parameters(), OPTIM["weight_decay"]), lr=OPTIM["lr"], eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    opt.step()
    return {"loss": loss.item(), "norm": norm.item(), "state": model.state_dict(), "initial": initial,
            "outputs": values.detach()}


def engine_config(path: str, value_head: bool, zero_stage: int = 0, optim: dict | None = None,
                  **overrides) -> EngineConfig:
    optim_cfg = OptimConfig(**{**OPTIM, **(optim or {})}, zero_stage=zero_stage)
    return EngineConfig(model_path=path, value_head=value_head, optim=optim_cfg, **overrides)


# ---- rank side -----------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _max_diff(state: dict, ref: dict) -> float:
    return max((state[n] - ref[n]).abs().max().item() for n in state)


def _check_layout(engine, ref, loss_fn, batch):
    """One step; differences of this stage's (TP-gathered) weights and outputs to the reference."""
    share = dp_share(batch, engine.dims.dp, engine.dp_rank)
    if engine.cfg.value_head:
        before = engine.compute_values(share)
    else:
        before = engine.compute_log_probs(share)
    ref_out = dp_share({"o": ref["outputs"]}, engine.dims.dp, engine.dp_rank)["o"]
    metrics = engine.train_step(share, loss_fn)
    state = engine.stage_state_dict()
    return {"metrics": metrics, "names": sorted(state), "weights": _max_diff(state, ref["state"]),
            "outputs": None if before is None else (before - ref_out).abs().max().item(),
            "overlap": _overlap_counts(engine)}, state


def _overlap_counts(engine):
    """(buckets launched from hooks in the last backward, buckets without a tied copy, all buckets), or
    None without overlap."""
    reducer = engine.grad_reduce
    if reducer is None:
        return None
    tied = {id(p) for p in engine._tied_copies()}
    regular = sum(1 for b in reducer.buckets if not any(id(reducer.params[i]) in tied for i in b))
    return reducer.launched_in_backward, regular, len(reducer.buckets)


def engine_body(rank, world_size, paths, refs):
    capture = _Capture()
    logging.getLogger("hfrl.distributed.tensor_parallel").addHandler(capture)
    cache = GroupCache()
    batch = global_batch()
    results, states = {}, {}

    def build(name, layout=None, value_head=False, **overrides):
        layout = layout if layout is not None else LAYOUTS[name][0]
        groups = build_groups("actor", ParallelDims.create(world_size, **layout), tuple(range(world_size)), rank, cache)
        return TrainEngine(engine_config(paths[value_head], value_head, **overrides), groups)

    for name, (layout, overrides, value_head) in LAYOUTS.items():
        engine = build(name, layout, value_head, **overrides)
        loss_fn = value_loss if value_head else policy_loss(engine)
        results[name], states[name] = _check_layout(engine, refs[value_head], loss_fn, batch)
    for plain, zero in (("tp2_dp2", "tp2_dp2_zero1"), ("pp2_dp2_count", "pp2_dp2_zero1"),
                        ("pp2_dp2_count", "pp2_dp2_budget"), *OVERLAP_PAIRS):
        results[f"{plain}=={zero}"] = _max_diff(states[zero], states[plain])

    # a NaN loss on one DP rank skips the step on every rank and leaves no trace
    engine = build("skip", dict(tp=2), num_micro_batches=2)
    good = policy_loss(engine)

    def nan_on_dp1(logits, mb):
        loss, metrics = good(logits, mb)
        return loss * (float("nan") if engine.dp_rank == 1 else 1.0), metrics

    skipped = engine.train_step(dp_share(batch, 2, engine.dp_rank), nan_on_dp1)
    unchanged = _max_diff(engine.stage_state_dict(), refs[False]["initial"])
    after = engine.train_step(dp_share(batch, 2, engine.dp_rank), good)
    results["skip"] = {"skipped": skipped, "unchanged": unchanged, "after": after,
                       "weights": _max_diff(engine.stage_state_dict(), refs[False]["state"]),
                       "scheduler_steps": engine.scheduler.last_epoch}
    # skipped steps in a row: a good step in between resets the count; the third in a row stops the run
    engine = build("skip_limit", dict(tp=2), num_micro_batches=2, optim=dict(max_consecutive_skips=3))
    fine = policy_loss(engine)

    def nan(logits, mb):
        loss, metrics = fine(logits, mb)
        return loss * float("nan"), metrics

    steps, error = [], None
    try:
        for loss_fn in (nan, nan, fine, nan, nan, nan, fine):
            steps.append(engine.train_step(dp_share(batch, 2, engine.dp_rank), loss_fn)["skipped"])
    except FloatingPointError as err:
        error = str(err)
    results["skip_limit"] = {"steps": steps, "error": error, "count": engine.skips_in_a_row}
    # bf16 with fp32 masters at pp=2: grads move into fp32 accumulators after every micro-batch,
    # and the tied embedding's two copies (stage 0, last stage) get the same summed gradient;
    # with the DP reduction overlapped (hooks move the last micro-batch's grads), the same bits.
    for name, overlap in (("bf16", NO_OVERLAP), ("bf16_overlap", OVERLAP)):
        engine = build(name, dict(pp=2), dtype="bfloat16", num_micro_batches=4, **overlap)
        before = {n: t.float() for n, t in engine.stage_state_dict().items()}  # float(): copies
        metrics = engine.train_step(dp_share(batch, 2, engine.dp_rank), policy_loss(engine))
        state = {n: t.float() for n, t in engine.stage_state_dict().items()}
        tied = engine.model.embed_tokens if engine.model.embed_tokens is not None else engine.model.lm_head
        opt = engine.optimizer
        master_of = {id(p): master for p, master in zip(opt.model_params, opt.master_params)}
        masters = engine.stage_state_dict({n: master_of[id(p)]
                                           for n, p in engine.model.named_parameters(remove_duplicate=False)})
        results[name] = {"metrics": metrics, "before": before,
                         "weights": {n: t.detach().clone() for n, t in engine.stage_state_dict().items()},
                         "masters": {n: t.detach().clone() for n, t in masters.items()},
                         "tied": tied.weight.detach().float().clone(), "overlap": _overlap_counts(engine),
                         "masters_fp32": all(m.dtype == torch.float32 for m in opt.master_params)}
        states[name] = state
    results["bf16==bf16_overlap"] = _max_diff(states["bf16_overlap"], states["bf16"])
    results["log"] = capture.messages
    logging.getLogger("hfrl.distributed.tensor_parallel").removeHandler(capture)
    return results


# ---- tests ---------------------------------------------------------------------------------------------


# ---- one 4-rank run for several modules ----------------------------------------------------------------
# Starting 4 ranks (imports, process group) and ending them costs seconds per run. These modules' 4-rank
# bodies run one after another in one set of processes, each body starting from the default RNG state of a
# fresh process; only modules with selected tests take part. Each module's ``rank_job(tmp_path_factory)``
# prepares in the parent and returns (body, body args, parent data); ``shared_4rank_run`` gives the
# module back (parent data, [body result per rank]). Other process-wide state does carry over: this
# module's body goes first, as test_padded_vocab_is_announced needs the once-per-process padding warning.
SHARED_4RANK_MODULES = (__name__, "tests.engine.test_checkpoint", "tests.distributed.test_data_parallel",
                        "tests.distributed.test_grad_overlap", "tests.engine.test_optim",
                        "tests.distributed.test_pipeline_parallel", "tests.models.test_parallelize")
_shared_4rank: dict = {}


def run_bodies(rank, world_size, jobs):
    """Each (body, args) in turn; each result serialised as soon as its body returns."""
    fresh_seed = torch.initial_seed()
    out = []
    for body, args in jobs:
        torch.manual_seed(fresh_seed)
        buffer = io.BytesIO()
        torch.save(body(rank, world_size, *args), buffer)
        out.append(buffer.getvalue())
    return out


def shared_4rank_run(request, tmp_path_factory, module: str):
    if module not in _shared_4rank:
        selected = {item.module.__name__ for item in request.session.items if hasattr(item, "module")}
        names = [n for n in SHARED_4RANK_MODULES if (n in selected or n == module) and n not in _shared_4rank]
        jobs = [importlib.import_module(n).rank_job(tmp_path_factory) for n in names]
        try:
            per_rank = run_ranks(4, run_bodies, [(body, args) for body, args, _ in jobs], init=True,
                                 timeout=min(180 * len(jobs), 600))
        except Exception as err:  # every module of the run gets the failure; none runs it again
            _shared_4rank.update((n, err) for n in names)
        else:
            for i, (n, (_, _, parent)) in enumerate(zip(names, jobs)):
                _shared_4rank[n] = (parent, [torch.load(io.BytesIO(r[i]), weights_only=False) for r in per_rank])
    result = _shared_4rank[module]
    if isinstance(result, Exception):
        raise result
    return result


def rank_job(tmp_path_factory):
    # Imported here, not at the top: the spawned ranks import this module (and test_checkpoint's), and
    # need no transformers model classes.
    from transformers import LlamaForSequenceClassification

    from tests.models._hf import build_hf

    policy_path = tmp_path_factory.mktemp("policy")
    build_hf("llama_gqa_tied", vocab_size=VOCAB, num_hidden_layers=4).save_pretrained(policy_path)
    critic_path = tmp_path_factory.mktemp("critic")
    build_hf("llama_gqa_tied", LlamaForSequenceClassification, vocab_size=VOCAB, num_hidden_layers=4, num_labels=1,
             pad_token_id=0).save_pretrained(critic_path)
    paths = {False: str(policy_path), True: str(critic_path)}
    refs = {value_head: reference_step(path, value_head, global_batch()) for value_head, path in paths.items()}
    return engine_body, (paths, refs), (refs, paths)


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    (refs, paths), results = shared_4rank_run(request, tmp_path_factory, __name__)
    return results, refs, paths


def test_bf16_step_keeps_tied_copies_equal_and_tracks_fp32(run):
    """The bf16 step moves each stage's fp32 masters as the fp32 reference step moves its weights.

    Compared as whole updates, not as weights: the update (lr=1e-2) is smaller than the bf16
    rounding of the weights, so weights within any tolerance of the reference would pass without a
    step. Relative error of the update vector: ~0.02 (bf16 forward and gradients); no step gives 1.
    """
    results, refs, _ = run
    ref = refs[False]
    first, last = results[0]["bf16"], results[2]["bf16"]      # stage 0 (ranks 0-1), stage 1 (2-3)
    assert torch.equal(first["tied"], last["tied"])             # embedding == tied lm_head copy
    assert abs(first["metrics"]["loss"] - ref["loss"]) < 2e-2  # the loss before the step, in bf16
    for stage in (first, last):
        assert stage["masters_fp32"]
        names = sorted(stage["masters"])
        for name in names:  # the bf16 weights are their masters rounded, after the step too
            assert stage["weights"][name].dtype == torch.bfloat16
            assert torch.equal(stage["weights"][name], stage["masters"][name].to(torch.bfloat16)), name
        got = torch.cat([(stage["masters"][n] - stage["before"][n]).flatten() for n in names])
        want = torch.cat([(ref["state"][n] - ref["initial"][n]).flatten() for n in names])
        error = ((got - want).norm() / want.norm()).item()
        assert error < 0.1, (names, error)


@pytest.mark.parametrize("plain, overlapped", OVERLAP_PAIRS + [("bf16", "bf16_overlap")])
def test_overlapped_grad_reduce_equals_reduce_after_backward(run, plain, overlapped):
    results = run[0]
    tol = TOL if overlapped.startswith("dp4") else 0.0  # dp=2: two-term sums, bit-equal; dp=4: rounding
    for rank, per_rank in enumerate(results):
        assert per_rank[f"{plain}=={overlapped}"] <= tol, (rank, per_rank[f"{plain}=={overlapped}"])
        assert per_rank[plain]["overlap"] is None
        launched, regular, total = per_rank[overlapped]["overlap"]
        # every bucket but the tied copies' (pp=2: summed across stages first) went out during backward
        assert launched == regular > 0, (rank, overlapped, launched, regular)
        tied_deferred = overlapped.startswith(("pp2", "bf16"))  # both stages hold a copy
        assert total > regular if tied_deferred else total == regular, (rank, overlapped, regular, total)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_step_matches_single_process(run, name):
    results, refs, _ = run
    ref = refs[LAYOUTS[name][2]]
    assert ref["norm"] > OPTIM["grad_clip"]  # clipping is active: the norm must be right for the weights to be
    names = set()
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        assert r["weights"] < TOL, (name, rank, r["weights"])
        assert abs(r["metrics"]["loss"] - ref["loss"]) < TOL, (name, rank, r["metrics"], ref["loss"])
        assert abs(r["metrics"]["grad_norm"] - ref["norm"]) < TOL * ref["norm"], (name, rank, r["metrics"], ref["norm"])
        assert r["metrics"] == results[0][name]["metrics"], (name, rank)  # identical on every rank
        assert r["metrics"]["skipped"] == 0.0 and r["metrics"]["lr"] == OPTIM["lr"]
        assert r["metrics"]["num_tokens"] == float(target_mask(global_batch()["attention_mask"]).sum())
        if r["outputs"] is not None:  # log-probs / values before the step, on the last stage
            assert r["outputs"] < TOL, (name, rank, r["outputs"])
        names.update(r["names"])
    assert names == set(ref["state"])  # the stages together hold every parameter
    last_stage_ranks = [rank for rank, per_rank in enumerate(results) if per_rank[name]["outputs"] is not None]
    assert len(last_stage_ranks) == (4 // 2 if "pp2" in name else 4), last_stage_ranks


def test_zero1_and_token_budget_give_the_same_step(run):
    for rank, per_rank in enumerate(run[0]):
        for pair in ("tp2_dp2==tp2_dp2_zero1", "pp2_dp2_count==pp2_dp2_zero1", "pp2_dp2_count==pp2_dp2_budget"):
            assert per_rank[pair] < TOL, (rank, pair, per_rank[pair])


def test_nonfinite_step_is_skipped_on_every_rank(run):
    results, refs, _ = run
    for rank, per_rank in enumerate(results):
        r = per_rank["skip"]
        assert r["skipped"]["skipped"] == 1.0, (rank, r["skipped"])
        assert r["unchanged"] == 0.0, rank  # no update, no weight decay
        assert r["after"]["skipped"] == 0.0 and r["scheduler_steps"] == 1, rank
        assert r["weights"] < TOL, (rank, r["weights"])  # the next step is the reference's first step
        assert abs(r["after"]["loss"] - refs[False]["loss"]) < TOL


def test_steps_skipped_in_a_row_stop_the_run_on_every_rank(run):
    for rank, per_rank in enumerate(run[0]):
        r = per_rank["skip_limit"]
        assert r["steps"] == [1.0, 1.0, 0.0, 1.0, 1.0], (rank, r)  # the sixth raised before returning
        assert r["count"] == 3 and "3 optimizer steps in a row had a non-finite gradient norm" in r["error"], (rank, r)
        assert "optim.max_consecutive_skips=3" in r["error"]


def test_padded_vocab_is_announced(run):
    messages = run[0][0]["log"]
    assert any("vocab padded from 101 to 102" in m and "tp=2" in m for m in messages), messages


def test_single_process_engine_matches_reference(run):
    _, refs, paths = run
    engine = TrainEngine(engine_config(paths[False], False, num_micro_batches=3))
    batch = global_batch()
    log_probs = engine.compute_log_probs(batch)
    metrics = engine.train_step(batch, policy_loss(engine))
    assert (log_probs - refs[False]["outputs"]).abs().max() < TOL
    assert abs(metrics["loss"] - refs[False]["loss"]) < TOL
    assert _max_diff(engine.stage_state_dict(), refs[False]["state"]) < TOL


# ---- errors through the engine -------------------------------------------------------------------------


def _role(dims: ParallelDims) -> RoleGroups:
    """A RoleGroups without process groups: enough for checks that must fail before any collective."""
    return RoleGroups(role="actor", dims=dims, pool_ranks=tuple(range(dims.world_size)), coord=dims.coord(0),
                      groups={}, ranks={})


def test_layout_errors_fail_before_any_collective(run):
    path = run[2][False]
    with pytest.raises(ValueError, match=r"tp=3.*num_heads=4, num_kv_heads=2"):
        TrainEngine(engine_config(path, False), _role(ParallelDims(tp=3)))
    with pytest.raises(ValueError, match=r"pp=8.*4 layers"):
        TrainEngine(engine_config(path, False), _role(ParallelDims(pp=8)))
    with pytest.raises(ValueError, match="both set"):
        engine_config(path, False, num_micro_batches=2, max_tokens_per_micro_batch=10).validate()
    with pytest.raises(ValueError, match="float16"):
        engine_config(path, False, dtype="float16").validate()
    with pytest.raises(ValueError, match="overlap_grad_reduce='yes'"):
        engine_config(path, False, overlap_grad_reduce="yes").validate()


def test_checkpoint_errors_through_the_engine(run, tmp_path):
    from tests.models._hf import build_hf

    path = run[2][False]
    bad = tmp_path / "bad"
    build_hf("llama_gqa_tied", vocab_size=VOCAB, num_hidden_layers=4).save_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\(96, 64\).*\(80, 64\)"):
        TrainEngine(engine_config(str(bad), False))
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*llama, qwen2, mistral"):
        TrainEngine(engine_config(str(bad), False))
    with pytest.raises(ValueError, match="score.weight"):  # a critic from an actor checkpoint needs the opt-in
        TrainEngine(engine_config(path, True))
    critic = TrainEngine(engine_config(path, True, init_missing_value_head=True))
    assert critic.compute_values(global_batch()).shape == (B, T)
