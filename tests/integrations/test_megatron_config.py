"""hfrl_model_config on megatron-core TransformerConfigs, in one process (no spawn, no groups): every
forward-changing field is either listed with its accepted values, mapped, or refused by name; the
sliding window maps to hfrl's; a model folder path with ``..`` is the one MODEL_SOURCES is looked up by.

Skipped without megatron-core (the config dataclass is all it needs)."""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

import torch.nn.functional as F  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from hfrl.integrations.megatron import hfrl_model_config, model_folder  # noqa: E402
from hfrl.integrations.megatron_weights import FORWARD_FIELDS, MAPPED_FIELDS, NUMERICS_FIELDS  # noqa: E402
from hfrl.workers.common import MODEL_SOURCES, lookup_model_source, model_source  # noqa: E402

LLAMA = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=48,
             normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, activation_func=F.silu,
             layernorm_epsilon=1e-6)


def model(**changes):
    """What hfrl_model_config reads of a GPTModel, around a real TransformerConfig."""
    return SimpleNamespace(config=TransformerConfig(**{**LLAMA, **changes}), position_embedding_type="rope",
                           rotary_percent=1.0, rotary_scaling=False, rotary_pos_emb=None, vocab_size=32,
                           rotary_base=10000, max_sequence_length=64, share_embeddings_and_output_weights=False)


def refused(**changes) -> str:
    with pytest.raises(ValueError) as err:
        hfrl_model_config(model(**changes), 20)
    return str(err.value)


def test_llama_style_accepted():
    config = hfrl_model_config(model(), 20)
    assert (config.model_type, config.num_heads, config.num_kv_heads, config.head_dim) == ("llama", 8, 4, 8)
    assert config.sliding_window is None and set(config.layer_types) == {"full_attention"}


@pytest.mark.parametrize("changes,words", [
    (dict(no_rope_freq=[0, 1, 0, 1]), "no_rope_freq=[0, 1, 0, 1] (hfrl needs None)"),
    (dict(no_rope_freq=2), "no_rope_freq="),
    (dict(softmax_type="off-by-one"), "softmax_type='off-by-one' (hfrl needs 'vanilla')"),
    (dict(softmax_type="learnable"), "softmax_type='learnable'"),
    (dict(qk_l2_norm=True), "qk_l2_norm=True (hfrl needs False)"),
    (dict(attention_output_gate=True), "attention_output_gate=True"),
    (dict(heterogeneous_block_specs=True), "heterogeneous_block_specs=True"),
    (dict(experimental_attention_variant="gated_delta_net", linear_attention_freq=2),
     "experimental_attention_variant='gated_delta_net'"),
    (dict(glu_linear_offset=1.0), "glu_linear_offset=1.0 (hfrl needs 0.0)"),
    (dict(activation_func=F.gelu), "activation_func=gelu (hfrl needs silu)"),
    (dict(window_size=(3, 2)), "window_size=(3, 2) (hfrl's sliding window is causal"),
    (dict(window_size=(3, 0), add_bias_linear=True), "window_size=(3, 0) with window_attn_skip_freq=None"),
])
def test_forward_changing_fields_refused_by_name(changes, words):
    message = refused(**changes)
    assert words in message, message
    assert "To embed hfrl, build the GPTModel Llama-style" in message


def test_linear_attention_refused_by_name():
    message = refused(experimental_attention_variant="gated_delta_net", linear_attention_freq=2)
    assert "linear_attention_freq=" in message


def test_every_refusal_at_once():
    message = refused(no_rope_freq=[0, 1, 0, 1], softmax_type="off-by-one", normalization="LayerNorm")
    for word in ("no_rope_freq", "softmax_type", "normalization='LayerNorm'"):
        assert word in message


def test_window_maps_to_hfrls_sliding_window():
    # Megatron's (left, 0): query i sees keys i-left..i, itself and `left` before it: hfrl's window left + 1.
    config = hfrl_model_config(model(window_size=(3, 0)), 20)
    assert (config.model_type, config.sliding_window) == ("mistral", 4)
    assert set(config.layer_types) == {"sliding_attention"}
    assert config.to_hf().sliding_window == 4   # config.json keeps it
    # Qwen2-style (q/k/v bias only), every 2nd layer full (Megatron numbers layers from 1)
    config = hfrl_model_config(model(window_size=(5, 0), window_attn_skip_freq=2, add_qkv_bias=True), 20)
    assert config.model_type == "qwen2" and config.sliding_window == 6
    assert config.layer_types == ("sliding_attention", "full_attention") * 2
    config = hfrl_model_config(model(window_size=(5, 0), window_attn_skip_freq=[1, 1, 0, 0], add_qkv_bias=True), 20)
    assert config.layer_types == ("sliding_attention",) * 2 + ("full_attention",) * 2


# What may differ from Megatron's default without changing the function hfrl computes: parallelism,
# initialisation, fusions and kernels, recomputation, offloading, CUDA graphs, communication overlap,
# logging, inference-only settings, and the sub-settings of features FORWARD_FIELDS refuses (MoE, MTP,
# DSA, linear attention, Mamba: only read when those are on).
NO_FORWARD_EFFECT_PREFIXES = (
    "tensor_model_parallel", "pipeline_model_parallel_", "virtual_pipeline", "sequence_parallel", "context_parallel",
    "hierarchical_context", "max_seqlen_per", "hybrid_context", "expert_", "moe_", "perform_initialization",
    "use_cpu_initialization", "timers", "finalize_model_grads", "grad_", "no_sync", "param_sync", "deterministic",
    "enable_autocast", "autocast_dtype", "num_microbatches", "gradient_accumulation", "async_tensor", "use_te_",
    "tp_comm", "cross_entropy", "overlap_", "delay_wgrad", "ep_overlap", "pipeline_dtype", "variable_seq",
    "batch_p2p", "use_ring", "deallocate", "defer_embedding", "wgrad_", "microbatch_group", "mtp_", "cpu_offloading",
    "_cpu_offloading", "barrier_with", "init_", "output_layer_init", "embedding_init", "bias_activation_fusion",
    "masked_softmax_fusion", "persist_layer_norm", "memory_efficient", "bias_dropout_fusion", "apply_rope_fusion",
    "use_fused", "fused_single", "recompute", "distribute_saved", "fp8_", "fp4_", "tp_only_amax", "num_layers_at_",
    "use_kitchen", "kitchen_", "cp_comm", "enable_cuda_graph", "cuda_graph", "external_cuda_graph",
    "clone_scatter", "disable_", "config_logger", "flash_decode", "batch_invariant", "inference_", "symmetric_ar",
    "use_inference", "mamba_", "use_mamba", "mlp_chunks", "hetereogenous_dist", "quant_recipe", "transformer_impl",
    "fine_grained", "offload_modules", "min_offloaded", "attention_backend", "test_mode", "calculate_per_token",
    "qk_clip", "log_max_attention", "dsa_", "linear_conv", "linear_key", "linear_value", "linear_num",
    "activation_func_fp8", "moe_extended",
)


def test_every_transformer_config_field_is_classified():
    # A megatron-core release (setup.py allows >=0.16.1,<0.17) that adds a field fails here until the field
    # is put in FORWARD_FIELDS (refused unless accepted), MAPPED_FIELDS, or the list above.
    known = set(FORWARD_FIELDS) | set(MAPPED_FIELDS) | set(NUMERICS_FIELDS)
    unclassified = [f.name for f in dataclasses.fields(TransformerConfig)
                    if f.name not in known and not f.name.startswith(NO_FORWARD_EFFECT_PREFIXES)]
    assert unclassified == []


def test_model_source_key_is_shared_by_registration_and_lookup(tmp_path):
    run_dir = tmp_path / "a" / ".." / "run"   # a run_dir spelled with ".."
    folder = model_folder(run_dir)
    assert ".." not in str(folder) and folder == (tmp_path / "run" / "megatron_model").resolve()
    source = object()
    with model_source(folder, source):
        # the engine looks the path up as resolve_for_run wrote it, and as a user might spell it
        for spelling in (str(folder), str(run_dir / "megatron_model"),
                         os.path.relpath(tmp_path / "run" / "megatron_model")):
            assert lookup_model_source(spelling) is source, spelling
        os.makedirs(tmp_path / "run")
        os.symlink(tmp_path / "run", tmp_path / "link")
        assert lookup_model_source(tmp_path / "link" / "megatron_model") is source
    assert lookup_model_source(folder) is None and not MODEL_SOURCES


def test_hand_back_dtype_change_is_warned(caplog):
    import torch

    from hfrl.integrations.megatron import _warn_dtype

    megatron, actor = torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.Linear(2, 2)
    with caplog.at_level("WARNING", logger="hfrl.integrations.megatron"):
        _warn_dtype(megatron, actor)
        _warn_dtype(actor, actor)   # same dtype: silent
    assert len(caplog.records) == 1
    assert "torch.float32" in caplog.text and "torch.bfloat16" in caplog.text
