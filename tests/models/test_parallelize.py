"""Tensor-parallel hfrl models on real gloo processes against transformers and the single-process model.

One 4-process run covers tp = 1 (singleton groups and group=None), 2 ([0 1] [2 3]) and 4 (the world;
with 2 kv heads this replicates each kv head on 2 ranks); its processes also run other modules' bodies
(see tests.engine.test_train_engine.shared_4rank_run). The parent builds the transformers models,
saves them, and computes the reference outputs; the ranks load with ``tp_from_pretrained`` and
return their differences (and saved checkpoints) for the parent to assert.
"""
import pytest
import torch
import torch.distributed as dist

from hfrl.distributed.tensor_parallel import (
    gather_vocab_logits, padded_vocab_size, tp_local_sq_norm, vocab_parallel_entropy, vocab_parallel_log_probs,
)
from hfrl.models import weights
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM
from hfrl.models.parallelize import (
    check_tp, gather_full_state_dict, parallelize_model, save_tp_pretrained, tp_from_pretrained,
)
from tests.engine.test_train_engine import shared_4rank_run

TOL = 1e-5
T = 12
# case -> (vocab, overrides); 101 is padded at tp=2 and 4. Llama gets every bias: q/k/v and gate/up
# (column-split) and o_proj/down_proj (replicated, added once after the row-parallel reduce).
CASES = {"llama_gqa_tied": (101, dict(attention_bias=True, mlp_bias=True)), "qwen2_bias": (100, {}),
         "mistral_window": (101, {})}
SAVED = {("llama_gqa_tied", "4"), ("qwen2_bias", "2")}  # (case, tp) written back with save_tp_pretrained
EXPECTED_TAGS = {"embed_tokens.weight": "vocab", "lm_head.weight": "vocab", "qkv_proj.weight": "column",
                 "qkv_proj.bias": "column", "o_proj.weight": "row", "gate_up_proj.weight": "column",
                 "gate_up_proj.bias": "column",
                 "down_proj.weight": "row"}


def build_hf(*args, **kwargs):
    """``tests.models._hf.build_hf``, imported when first used: the spawned ranks import this module
    and build no transformers model (importing the model classes costs each rank seconds)."""
    from tests.models._hf import build_hf as build

    return build(*args, **kwargs)


def _inputs(vocab):
    """A right/left-padded batch (3, T) and a packed one (1, 16) of three sequences."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, T), generator=gen)
    ids[0, :2] = torch.tensor([0, vocab - 1])  # first and last token ids
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :9] = 0  # left padding
    packed = torch.randint(0, vocab, (1, 16), generator=gen)
    cu_seqlens = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    return ids, mask, packed, cu_seqlens


@torch.no_grad()
def _reference(ref, vocab):
    ids, mask, packed, cu_seqlens = _inputs(vocab)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = ref(ids, attention_mask=mask, position_ids=position_ids).logits
    bounds = cu_seqlens.tolist()
    packed_ref = torch.cat([ref(packed[:, a:b]).logits for a, b in zip(bounds, bounds[1:])], dim=1)
    return padded, packed_ref


# ---- rank side -------------------------------------------------------------------------------------


def _members(group):
    return dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]


def _logit_diffs(path, group, vocab, ref_padded, ref_packed):
    model = tp_from_pretrained(path, group).eval()
    ids, mask, packed, cu_seqlens = _inputs(vocab)
    tp = len(_members(group))
    with torch.no_grad():
        local = model(ids, attention_mask=mask)
        padded = gather_vocab_logits(local, group, vocab)
        packed_logits = gather_vocab_logits(model(packed, cu_seqlens=cu_seqlens), group, vocab)
    converted = parallelize_model(weights.from_pretrained(path).eval(), group)  # slices real weights in place
    with torch.no_grad():
        converted_logits = gather_vocab_logits(converted(ids, attention_mask=mask), group, vocab)
    attn = model.layers[0].attn
    return {
        "padded": (padded[mask.bool()] - ref_padded[mask.bool()]).abs().max().item(),
        "converted": (converted_logits[mask.bool()] - ref_padded[mask.bool()]).abs().max().item(),
        "packed": (packed_logits - ref_packed).abs().max().item(),
        "local_width": (local.shape[-1], padded_vocab_size(vocab, tp) // tp),
        "heads": (attn.num_heads, attn.num_kv_heads),
        "tags": {name: getattr(p, "hfrl_shard", None) for name, p in model.named_parameters()},
    }, model


def _loss(logits_or_local, ids, mask, group=None, vocab=None):
    """Masked next-token log-prob plus entropy, weighted: exercises both vocab-parallel backwards."""
    labels, weight = ids.roll(-1, 1), mask.float() * torch.linspace(0.5, 1.5, ids.shape[1])
    if group is None and vocab is None:  # single process, full logits
        log_p = torch.log_softmax(logits_or_local, -1)
        lp = log_p.gather(-1, labels[..., None]).squeeze(-1)
        ent = -(log_p.exp() * log_p).sum(-1)
    else:
        lp = vocab_parallel_log_probs(logits_or_local, labels, group)
        ent = vocab_parallel_entropy(logits_or_local, group)
    return -(lp * weight).sum() / weight.sum() + 0.1 * (ent * weight).sum() / weight.sum()


def _grad_diffs(path, group, vocab):
    """One backward at this tp: reassembled parameter gradients vs the single-process model's."""
    ids, mask, _, _ = _inputs(vocab)
    full = weights.from_pretrained(path)
    _loss(full(ids, attention_mask=mask), ids, mask).backward()
    ref = {name: p.grad for name, p in full.named_parameters(remove_duplicate=False)}

    model = tp_from_pretrained(path, group)
    _loss(model(ids, attention_mask=mask), ids, mask, group, vocab).backward()
    local = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    grads = gather_full_state_dict(model, group, state=local)
    scale = max(g.abs().max().item() for g in ref.values())
    out = {"grad": max((grads[n] - ref[n]).abs().max().item() for n in ref) / scale,  # relative to the largest
           "grad_names": sorted(grads) == sorted(ref)}
    # kv replicas (tp=4, 2 kv heads) must hold equal gradients after backward
    qkv = model.layers[0].attn.qkv_proj
    shards = [torch.empty_like(qkv.weight.grad) for _ in _members(group)]
    dist.all_gather(shards, qkv.weight.grad, group=group)
    start, stop = qkv.kv_rows
    out["kv_replicas_equal"] = all(torch.equal(shards[r][start:stop], shards[r - r % qkv.kv_replicas][start:stop])
                                   for r in range(len(shards)))
    # the shard tags let a clipper count every element once: sum over ranks = single-process norm
    sq = sum(tp_local_sq_norm(p.grad, p, group) for p in model.parameters())
    dist.all_reduce(sq, group=group)
    ref_sq = sum(p.grad.pow(2).sum() for p in full.parameters())
    out["grad_norm_rel"] = abs(sq.item() - ref_sq.item()) / ref_sq.item()
    return out


def _stage_diff(path, group, vocab, ref_padded):
    """Two pipeline stages, each tensor-parallel, compose to the reference."""
    ids, mask, _, _ = _inputs(vocab)
    first = tp_from_pretrained(path, group, layer_range=(0, 1)).eval()
    last = tp_from_pretrained(path, group, layer_range=(1, 2)).eval()
    with torch.no_grad():
        logits = gather_vocab_logits(last(hidden_states=first(ids, attention_mask=mask), attention_mask=mask),
                                     group, vocab)
    stage_sd = gather_full_state_dict(last, group)
    return {"stages": (logits[mask.bool()] - ref_padded[mask.bool()]).abs().max().item(),
            "stage_names": sorted(stage_sd) == sorted(last.state_dict())}


def _value_diff(path, group, ref_values):
    ids, mask, _, _ = _inputs(101)
    critic = tp_from_pretrained(path, group, value_head=True).eval()
    with torch.no_grad():
        values = critic(ids, attention_mask=mask)
    return {"values": (values[mask.bool()] - ref_values[mask.bool()]).abs().max().item(),
            "score_tag": getattr(critic.score.weight, "hfrl_shard", None)}


def _bad_tp(path, group):
    messages = []
    try:
        tp_from_pretrained(path, group)
    except ValueError as e:
        messages.append(str(e))
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_pretrained(path))
    try:
        parallelize_model(model, group)
    except ValueError as e:
        messages.append(str(e))
    return messages


def model_body(rank, world_size, cases, value_case, out_dir):
    singles = [dist.new_group([r]) for r in range(world_size)]  # collective: every rank makes every group
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    three = dist.new_group([0, 1, 2])
    groups = {"none": None, "1": singles[rank], "2": pairs[rank // 2], "4": dist.group.WORLD}
    results = {}
    for case, (path, vocab, ref_padded, ref_packed) in cases.items():
        for tp, group in groups.items():
            results[(case, tp)], model = _logit_diffs(path, group, vocab, ref_padded, ref_packed)
            if (case, tp) in SAVED:
                save_tp_pretrained(model, group, f"{out_dir}/{case}_tp{tp}_{_members(group)[0]}")
            if tp in ("2", "4"):
                results[(case, tp)].update(_grad_diffs(path, group, vocab))
    path, _, ref_padded, _ = cases["llama_gqa_tied"]
    results[("stages", "2")] = _stage_diff(path, groups["2"], 101, ref_padded)
    value_path, ref_values = value_case
    results[("value", "2")] = _value_diff(value_path, groups["2"], ref_values)
    results["bad_tp"] = _bad_tp(path, three) if rank < 3 else None
    return results


# ---- parent side -----------------------------------------------------------------------------------


def rank_job(tmp_path_factory):
    """This module's part of the shared 4-rank run (see tests.engine.test_train_engine.shared_4rank_run)."""
    from transformers import LlamaForSequenceClassification

    cases, refs = {}, {}
    for case, (vocab, overrides) in CASES.items():
        ref = build_hf(case, vocab_size=vocab, num_hidden_layers=2, **overrides)
        path = tmp_path_factory.mktemp(case)
        ref.save_pretrained(path)
        cases[case] = (str(path), vocab, *_reference(ref, vocab))
        refs[case] = ref
    critic = build_hf("llama_gqa_tied", LlamaForSequenceClassification, vocab_size=101, num_hidden_layers=2,
                      num_labels=1, pad_token_id=0)
    value_path = tmp_path_factory.mktemp("value")
    critic.save_pretrained(value_path)
    ids, mask, _, _ = _inputs(101)
    with torch.no_grad():
        hidden = critic.model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        ref_values = critic.score(hidden.last_hidden_state).squeeze(-1)
    out_dir = tmp_path_factory.mktemp("saved")
    return model_body, (cases, (str(value_path), ref_values), str(out_dir)), (refs, cases, out_dir)


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    (refs, cases, out_dir), results = shared_4rank_run(request, tmp_path_factory, __name__)
    return results, refs, cases, out_dir


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(run, case):
    results = run[0]
    for rank, per_rank in enumerate(results):
        for tp in ("none", "1", "2", "4"):
            r = per_rank[(case, tp)]
            assert r["padded"] < TOL and r["packed"] < TOL and r["converted"] < TOL, (rank, tp, r)
            assert r["local_width"][0] == r["local_width"][1], (rank, tp)
            size = {"none": 1, "1": 1, "2": 2, "4": 4}[tp]
            assert r["heads"] == (4 // size, max(1, 2 // size)), (rank, tp)  # tp=4: kv heads replicated


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_single_process(run, case):
    for rank, per_rank in enumerate(run[0]):
        for tp in ("2", "4"):
            r = per_rank[(case, tp)]
            assert r["grad_names"] and r["grad"] < TOL, (rank, tp, r["grad"])
            assert r["kv_replicas_equal"], (rank, tp)
            assert r["grad_norm_rel"] < 1e-5, (rank, tp, r["grad_norm_rel"])


def test_sharded_params_are_tagged(run):
    tags = run[0][0][("llama_gqa_tied", "2")]["tags"]
    assert "layers.0.attn.o_proj.bias" in tags and "layers.0.mlp.gate_up_proj.bias" in tags
    for name, tag in tags.items():
        expected = next((t for suffix, t in EXPECTED_TAGS.items() if name.endswith(suffix)), None)
        assert tag == expected, (name, tag)  # norms (and o_proj/down biases if any) stay untagged
    assert run[0][0][("value", "2")]["score_tag"] is None  # the value head is replicated


def test_pipeline_stages_and_value_head(run):
    for rank, per_rank in enumerate(run[0]):
        assert per_rank[("stages", "2")]["stages"] < TOL and per_rank[("stages", "2")]["stage_names"], rank
        assert per_rank[("value", "2")]["values"] < TOL, rank


@pytest.mark.parametrize("case,tp", sorted(SAVED))
def test_saved_merged_checkpoint_loads_in_transformers(run, case, tp):
    from transformers import AutoModelForCausalLM

    _, refs, cases, out_dir = run
    ref = refs[case]
    for leader in ((0, 2) if tp == "2" else (0,)):
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir / f"{case}_tp{tp}_{leader}", dtype=torch.float32)
        ref_sd, got_sd = ref.state_dict(), reloaded.state_dict()
        assert sorted(ref_sd) == sorted(got_sd)
        assert all(torch.equal(ref_sd[n], got_sd[n]) for n in ref_sd)
        ids, mask, _, _ = _inputs(CASES[case][0])
        with torch.no_grad():
            assert torch.equal(reloaded(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_tp_not_dividing_heads_is_a_clear_error(run):
    for rank in range(3):
        messages = run[0][rank]["bad_tp"]
        assert len(messages) == 2
        assert all("tp=3" in m and "num_heads=4" in m and "num_kv_heads=2" in m for m in messages), messages
    with pytest.raises(ValueError, match="tp=3.*num_heads=4, num_kv_heads=2"):
        check_tp(ModelConfig.from_hf(build_hf("llama_gqa_tied").config), 3)
    with pytest.raises(ValueError, match="tp=8"):
        check_tp(ModelConfig.from_hf(build_hf("llama_gqa_tied").config), 8)


@pytest.mark.parametrize("vocab", [101, 5])
def test_shard_and_merge_are_inverse(vocab):
    """Single process: every parameter's shards (kv heads replicated at tp=4) merge back exactly."""
    config = ModelConfig.from_hf(build_hf("llama_gqa_tied", vocab_size=vocab, num_hidden_layers=1,
                                          attention_bias=True, mlp_bias=True).config)
    torch.manual_seed(0)
    state = CausalLM(config).state_dict()
    for spec in weights.param_plan(config):
        for tp in (1, 2, 4):
            shards = [weights.shard_tensor(spec, state[spec.name], r, tp, replicate_kv_heads=True) for r in range(tp)]
            assert len({s.shape for s in shards}) == 1, (spec.name, tp)  # equal shapes: all_gather-able
            assert torch.equal(weights.merge_shards(spec, shards, replicate_kv_heads=True), state[spec.name])
            if spec.shard == "vocab":
                assert shards[0].shape[0] == padded_vocab_size(vocab, tp) // tp
