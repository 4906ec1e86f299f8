"""hfrl inside a megatron-core job, on real gloo processes: adopting parallel_state's groups (tp2,
pp2, tp2 x pp2 on 4 ranks), refusing what hfrl cannot adopt on every rank, and the per-rank weight
conversion at tp2 (a bit-identical round trip, log-probs equal to Megatron's forward).

Skipped without megatron-core (``pip install hfrl[megatron]``). Each spawn imports megatron-core once
(about 6 s of CPU per process on this machine), so every check of a world size shares one spawn.
"""
from __future__ import annotations

import importlib.util

import pytest

from tests.multiproc import run_ranks

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed (pip install hfrl[megatron])", allow_module_level=True)

# ---- 4 ranks, one spawn: group adoption, refusals, weights ---------------------------------------------

ADOPT_CASES = {   # name: (initialize_model_parallel kwargs, generation layout)
    "tp2": (dict(tensor_model_parallel_size=2), dict(tg=1)),
    "pp2": (dict(pipeline_model_parallel_size=2), dict(pg=1)),
    "tp2xpp2": (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), dict(tg=1, pg=1)),
}
REFUSE_CASES = {   # name: (initialize_model_parallel kwargs, hfrl config overrides or None)
    "context_parallel": (dict(tensor_model_parallel_size=2, context_parallel_size=2), None),
    "rank_order": (dict(pipeline_model_parallel_size=2, order="tp-cp-ep-pp-dp"), None),
    "config_layout": (dict(tensor_model_parallel_size=2), ["roles.actor.tp=1"]),
}


def _adopt_case(rank, init_kwargs, gen):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from hfrl.integrations.megatron import ADOPTED_AXES, adopt_parallel_state

    mps.initialize_model_parallel(**init_kwargs)
    try:
        adopted = adopt_parallel_state(**gen)
        groups = adopted.role_groups()
        out = {"dims": adopted.dims.to_dict(), "ranks": {}, "same_object": {}}
        for axis, getter in ADOPTED_AXES.items():
            theirs = getattr(mps, getter)()
            out["ranks"][axis] = (groups.ranks[axis], tuple(dist.get_process_group_ranks(theirs)))
            # Megatron's own object (when two axes share their ranks, tp and mp at pp = 1, the first one's)
            out["same_object"][axis] = any(groups.groups[axis] is getattr(mps, g)() for g in ADOPTED_AXES.values())
        for axis in ("gen_tp", "micro_dp"):   # built by hfrl: a collective on each must work
            value = torch.tensor([float(rank)])
            dist.all_reduce(value, group=groups.groups[axis])
            out[axis] = (groups.ranks[axis], float(value))
        out["micro_dp_is_megatron_tp"] = groups.groups["micro_dp"] is mps.get_tensor_model_parallel_group()
        return out
    finally:
        mps.destroy_model_parallel()


def _refuse_case(init_kwargs, overrides, run_dir):
    from megatron.core import parallel_state as mps

    from hfrl.config import load_config
    from hfrl.integrations.megatron import adopt_parallel_state, train

    mps.initialize_model_parallel(**init_kwargs)
    try:
        if overrides is None:
            adopt_parallel_state()
        else:   # through the entry point itself
            config = load_config(None, ["data.task=max_digit", f"trainer.run_dir={run_dir}", *overrides])
            train(build_gpt(mps.get_tensor_model_parallel_world_size(), 1), config)
        return None
    except ValueError as err:
        return str(err)
    finally:
        mps.destroy_model_parallel()


def _stage_dependent_failure(run_dir):
    """train() on pp2 where every stage was built with pre_process=True (a user error): stage 1 holds an
    embedding hfrl's stage 1 has no place for, stage 0 converts fine. Every rank must raise, before hfrl.run."""
    from megatron.core import parallel_state as mps

    from hfrl.config import load_config
    from hfrl.integrations.megatron import layout_overrides, train

    mps.initialize_model_parallel(pipeline_model_parallel_size=2)
    try:
        config = load_config(None, ["data.task=max_digit", f"trainer.run_dir={run_dir}", "data.max_prompt_length=32",
                                    "rollout.max_new_tokens=16", *layout_overrides()])
        train(build_gpt(1, 2, pre_process=True), config)
        return None
    except ValueError as err:
        return str(err)
    finally:
        mps.destroy_model_parallel()


def _refuse_architecture():
    """A GPTModel with LayerNorm, qk-norm, a plain GeLU MLP and learned positions: all named at once."""
    import torch
    from megatron.core import parallel_state as mps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from hfrl.integrations.megatron import hfrl_model_config

    mps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                normalization="LayerNorm", qk_layernorm=True, use_cpu_initialization=True,
                                params_dtype=torch.float32, tensor_model_parallel_size=2)
        model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="LayerNorm", qk_layernorm=True),
                         vocab_size=32, max_sequence_length=16)
        hfrl_model_config(model)
        return None
    except ValueError as err:
        return str(err)
    finally:
        mps.destroy_model_parallel()


# ---- weights: the same 4 ranks, tp2 x dp2 and tp2 x pp2 ------------------------------------------------

TRUE_VOCAB, MEGATRON_VOCAB = 20, 32   # Megatron pads its vocabulary; hfrl keeps the true one
WEIGHT_CASES = {"tp2": dict(tp=2, pp=1, tied=False), "tp2_tied": dict(tp=2, pp=1, tied=True),
                "tp2xpp2": dict(tp=2, pp=2, tied=False)}


def build_gpt(tp: int, pp: int, tied: bool = False, pre_process: bool | None = None):
    """A 2-layer Llama-style GPTModel (GQA 8 heads / 4 query groups: at tp2 each rank holds 2 groups of 2
    query heads, so the QKV regrouping is no identity) on this rank, every weight random (norms too);
    replicated tensors alike on the TP ranks, as Megatron keeps them. ``pre_process``: default the first
    stage's."""
    import zlib

    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as mps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                            ffn_hidden_size=48, use_cpu_initialization=True, params_dtype=torch.float32,
                            normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                            activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0,
                            layernorm_epsilon=1e-6, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            pipeline_dtype=torch.float32)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=MEGATRON_VOCAB,
                     max_sequence_length=64, position_embedding_type="rope",
                     share_embeddings_and_output_weights=tied,
                     pre_process=mps.is_pipeline_first_stage() if pre_process is None else pre_process,
                     post_process=mps.is_pipeline_last_stage())
    tp_rank = mps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            seed = zlib.crc32(name.encode()) + (1000 * tp_rank if sharded else 0)
            param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def megatron_log_probs(model, ids):
    """log p(ids[:, t+1]) from Megatron's forward, its vocab-sharded logits gathered, over the true vocab."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from hfrl.integrations.megatron import cpu_forward

    T = ids.shape[1]
    positions = torch.arange(T)[None].expand_as(ids)
    causal = torch.triu(torch.ones(1, 1, T, T, dtype=torch.bool), 1)   # True: masked
    with cpu_forward(), torch.no_grad():
        local = model(ids, positions, causal)   # (B, T, V_meg / tp)
    group = mps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    logits = torch.cat(parts, dim=-1)[..., :TRUE_VOCAB]
    return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def hfrl_log_probs(config, state, group, ids):
    import torch

    from hfrl.engine.train_engine import token_log_probs
    from hfrl.integrations.megatron import stage_model

    model = stage_model(config, (0, config.num_layers), group, device="cpu")
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    with torch.no_grad():
        return token_log_probs(model(ids), ids, group, vocab_size=config.vocab_size)


def _weights_case(rank, tp, pp, tied):
    import torch
    from megatron.core import parallel_state as mps

    from hfrl.distributed.pipeline_parallel import partition_layers
    from hfrl.integrations.megatron import copy_into_megatron, hfrl_model_config, hfrl_to_megatron, megatron_to_hfrl

    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        model = build_gpt(tp, pp, tied)
        group = mps.get_tensor_model_parallel_group()
        config = hfrl_model_config(model, TRUE_VOCAB)
        stage = partition_layers(config.num_layers, pp)[mps.get_pipeline_model_parallel_rank()]
        before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        state = megatron_to_hfrl(before, config, stage, group)
        back = hfrl_to_megatron(state, before, config, stage, group)
        out = {"round_trip_keys": sorted(back) == sorted(before),
               "round_trip_equal": all(torch.equal(back[k], before[k]) for k in back)}
        # Hand a changed shard back in place: Megatron holds exactly it, and its padding rows are untouched.
        doubled = {k: v * 2 for k, v in state.items()}
        copy_into_megatron(model, doubled, config, stage, group)
        again = megatron_to_hfrl(model.state_dict(), config, stage, group)
        out["in_place_equal"] = all(torch.equal(again[k], doubled[k]) for k in doubled)
        rows = MEGATRON_VOCAB // tp
        true_rows = max(0, min(rows, TRUE_VOCAB - rows * mps.get_tensor_model_parallel_rank()))
        out["padding_untouched"] = all(torch.equal(model.state_dict()[k][true_rows:], before[k][true_rows:])
                                       for k in ("embedding.word_embeddings.weight", "output_layer.weight")
                                       if k in before)
        if pp == 1:
            copy_into_megatron(model, state, config, stage, group)   # back to the original weights
            ids = torch.randint(0, TRUE_VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
            theirs = megatron_log_probs(model, ids)
            out["log_prob_error"] = float((hfrl_log_probs(config, state, group, ids) - theirs).abs().max())
            # The same comparison after a wrong conversion (gate and up swapped in layer 0): what the
            # tolerance must stay far below.
            wrong = dict(state)
            gate, up = wrong["layers.0.mlp.gate_up_proj.weight"].chunk(2)
            wrong["layers.0.mlp.gate_up_proj.weight"] = torch.cat([up, gate])
            out["wrong_mapping_error"] = float((hfrl_log_probs(config, wrong, group, ids) - theirs).abs().max())
        return out
    finally:
        mps.destroy_model_parallel()


def four_rank_body(rank, world_size, run_dir):
    import warnings

    warnings.filterwarnings("ignore")   # megatron-core's "Transformer Engine and Apex are not installed"
    adopted = {name: _adopt_case(rank, *case) for name, case in ADOPT_CASES.items()}
    refused = {name: _refuse_case(*case, run_dir) for name, case in REFUSE_CASES.items()}
    refused["architecture"] = _refuse_architecture()
    refused["stage_dependent"] = _stage_dependent_failure(run_dir)
    weights = {name: _weights_case(rank, **case) for name, case in WEIGHT_CASES.items()}
    return adopted, refused, weights


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(4, four_rank_body, str(tmp_path_factory.mktemp("refused_run")), init=True)


@pytest.mark.parametrize("case", sorted(ADOPT_CASES))
def test_adopted_groups_are_megatrons(four_ranks, case):
    for rank, (adopted, _, _) in enumerate(four_ranks):
        result = adopted[case]
        for axis, (ours, theirs) in result["ranks"].items():
            assert ours == theirs, (case, rank, axis)
            assert result["same_object"][axis], f"{case}: rank {rank} got a new {axis} group, not Megatron's"
    tp = ADOPT_CASES[case][0].get("tensor_model_parallel_size", 1)
    pp = ADOPT_CASES[case][0].get("pipeline_model_parallel_size", 1)
    assert four_ranks[0][0][case]["dims"] == {"pp": pp, "tp": tp, "dp": 4 // (tp * pp), "pg": 1, "tg": 1,
                                              "dg": tp * pp, "grouping": "hybridflow"}


def test_generation_groups_derived_from_adopted_ones(four_ranks):
    # Generating with tg = pg = 1: each rank is its own generation replica, and the micro-DP group (the
    # all-gather of the hybrid engine) is one training replica (tp x pp ranks), Megatron's groups:
    expected_micro = {"tp2": [(0, 1), (0, 1), (2, 3), (2, 3)], "pp2": [(0, 2), (1, 3), (0, 2), (1, 3)],
                      "tp2xpp2": [(0, 1, 2, 3)] * 4}
    for case, micro in expected_micro.items():
        for rank, (adopted, _, _) in enumerate(four_ranks):
            result = adopted[case]
            assert result["gen_tp"] == ((rank,), float(rank))
            assert result["micro_dp"] == (micro[rank], float(sum(micro[rank])))
            assert result["micro_dp_is_megatron_tp"] == (case == "tp2")


@pytest.mark.parametrize("case,words", [
    ("context_parallel", ["context_parallel_size=2", "context_parallel_size=1"]),
    ("rank_order", ["Megatron's pp groups [[0, 1], [2, 3]]", "hfrl's [[0, 2], [1, 3]]", "'tp-cp-ep-dp-pp'"]),
    ("config_layout", ["roles.actor.tp=1 but the Megatron job has tp=2", "set roles.actor.tp=2"]),
    ("architecture", ["position_embedding_type='learned_absolute'", "normalization='LayerNorm' (hfrl needs 'RMSNorm')",
                      "gated_linear_unit=False (hfrl needs True)", "activation_func=gelu (hfrl needs silu)",
                      "qk_layernorm=True (hfrl needs False)"]),
])
def test_refused_on_every_rank(four_ranks, case, words):
    for rank, (_, refused, _) in enumerate(four_ranks):
        message = refused[case]
        assert message is not None, f"{case} was accepted on rank {rank}"
        for word in words:
            assert word in message, (rank, message)


def test_stage_dependent_conversion_error_stops_every_rank(four_ranks):
    # pp2 x dp2: ranks 2, 3 hold stage 1, whose stray embedding fails the conversion; ranks 0, 1 would
    # otherwise go on into hfrl.run's group creation and wait there for ever.
    for rank, (_, refused, _) in enumerate(four_ranks):
        message = refused["stage_dependent"]
        assert message is not None, f"rank {rank} went on past a failed conversion"
        if rank in (2, 3):
            assert "embedding.word_embeddings.weight" in message and "no place in hfrl's decoder" in message
        else:
            assert "failed on ranks 2, 3" in message, message


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_weight_round_trip_is_bit_identical(four_ranks, case):
    for rank, (_, _, weights) in enumerate(four_ranks):
        result = weights[case]
        assert result["round_trip_keys"] and result["round_trip_equal"], (case, rank)
        assert result["in_place_equal"], f"{case}: rank {rank}: Megatron does not hold the handed-back shard"
        assert result["padding_untouched"], f"{case}: rank {rank}: Megatron's padded vocab rows changed"


@pytest.mark.parametrize("case", ["tp2", "tp2_tied"])
def test_converted_log_probs_equal_megatrons_forward(four_ranks, case):
    # fp32 on both sides; the models differ only in the order of operations (fused SDPA vs Megatron's
    # explicit softmax, RMSNorm and RoPE written differently): 1.7e-6 measured, the tolerance 10x that.
    # Swapping gate and up in one layer moves the log-probs by 2.5, five orders of magnitude above it.
    for rank, (_, _, weights) in enumerate(four_ranks):
        result = weights[case]
        assert result["log_prob_error"] < 2e-5, (case, rank, result)
        assert result["wrong_mapping_error"] > 1e-1, (case, rank, result)


# ---- the example, end to end under torchrun --------------------------------------------------------------


def test_example_hands_rl_weights_back_to_megatron(tmp_path):
    """examples/megatron_embed.py on 2 ranks (tp2): 2 GRPO steps. Megatron's forward after the hand-back
    must be the hfrl actor's: its log-probs on a probe batch equal those of the actor hfrl exported at the
    end of the run (run_dir/actor_hf, read here in one process), and differ from Megatron's before RL."""
    import json
    import os
    import subprocess
    import sys

    import torch

    from hfrl.distributed.env import free_port
    from hfrl.models.weights import from_pretrained

    run_dir, out = tmp_path / "run", tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "examples/megatron_embed.py", "--steps", "2", "--run-dir", str(run_dir), "--out", str(out),
           "--set", "trainer.progress_bar=false"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    probe = torch.tensor(report["probe_ids"])
    actor = from_pretrained(run_dir / "actor_hf")
    with torch.no_grad():
        logits = actor(probe)[..., :actor.config.vocab_size]
    exported = logits.log_softmax(-1)[:, :-1].gather(-1, probe[:, 1:, None])[..., 0]
    after, before = torch.tensor(report["log_probs_after"]), torch.tensor(report["log_probs_before"])
    assert (after - exported).abs().max() < 2e-5      # Megatron now computes what hfrl trained (see above)
    assert (after - before).abs().max() > 1e-2        # and RL did change it
    assert report["hfrl"]["steps"] == 2 and report["megatron"]["vocab_padded"] == 256
    megatron = report["megatron"]
    assert megatron["loss_after_more_steps"] < megatron["loss_after_rl"]   # Megatron trains on from there
