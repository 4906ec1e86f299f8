"""hfrl inside a megatron-core job: Megatron trains, hfrl runs GRPO on the same model with the job's own
process groups, Megatron goes on with the RL-trained weights. No restart, no checkpoint in between.

    pip install -e .[megatron]                                           # megatron-core 0.16.1
    torchrun --nproc-per-node 2 examples/megatron_embed.py               # tp=2
    torchrun --nproc-per-node 4 examples/megatron_embed.py --tp 2        # tp=2 x dp=2
    torchrun --nproc-per-node 2 examples/megatron_embed.py --steps 5 --set rollout.n=8

The program, on every rank:

    1. Megatron   init_process_group; parallel_state.initialize_model_parallel(tp); a Llama-style
                  GPTModel (RMSNorm, SwiGLU, RoPE, GQA) over the max_digit task's characters, the
                  vocabulary padded as Megatron-LM pads it; --megatron-steps supervised steps on the
                  task's answers
    2. hfrl       GRPO (rule reward, KL to the reference) for --steps steps: hfrl adopts the job's
                  groups and converts this rank's weight shard in memory; the trained actor shard is
                  written back into the GPTModel's parameters
    3. Megatron   the same supervised loss and --megatron-steps more steps on the updated model

Rank 0 prints one JSON line: Megatron's loss before and after RL, hfrl's rewards, and how far RL
moved the model's log-probs of a probe batch (--out also writes the probe and the log-probs).

CPU: gloo, and Megatron's forward inside ``cpu_forward()`` (its RoPE and attention assume CUDA; see
hfrl.integrations.megatron). On GPUs drop that context and initialise NCCL with the device set.
Megatron's own part keeps to pipeline parallel 1 (no pipeline schedule here); hfrl's part takes pp too.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hfrl.config import load_config
from hfrl.data import get_task
from hfrl.integrations import megatron as hfrl_megatron

TASK = "max_digit"
RL_JOB = [   # GRPO on the built-in task, sized for a CPU; --set overrides any key
    f"data.task={TASK}", "data.train_batch_size=8", "data.max_prompt_length=16", "data.val_size=16",
    "rollout.n=4", "rollout.max_new_tokens=4", "rollout.kv_cache_bytes=4194304",
    "roles.critic.enabled=false", "roles.reward.enabled=false",
    "algorithm.name=grpo", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=false", "algorithm.kl_estimator=k3",
    "algorithm.mini_batch_size=8", "engine.optim.lr=2.0e-3", "engine.optim.weight_decay=0.0",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel degree of the Megatron job")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps hfrl runs")
    parser.add_argument("--megatron-steps", type=int, default=2, help="supervised Megatron steps before and after")
    parser.add_argument("--run-dir", default="runs/megatron_embed", help="hfrl's metrics and checkpoints")
    parser.add_argument("--out", default=None, help="write the probe batch and its log-probs here (rank 0)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="hfrl config overrides")
    return parser.parse_args()


def build_model(tp: int, vocab_size: int, seed: int = 0):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        layernorm_epsilon=1e-6, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, params_dtype=torch.float32, init_method_std=0.05)
    padded = -(-vocab_size // (128 * tp)) * 128 * tp   # Megatron-LM's make_vocab_size_divisible_by=128
    torch.manual_seed(seed)   # use_cpu_initialization: every rank draws the full matrices, keeps its part
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded,
                    max_sequence_length=64, position_embedding_type="rope")


def answer_batch(tokenizer, num: int, seed: int):
    """Prompts and right answers of the task: ids (B, T) right-padded, loss mask (B, T) on answer + eos."""
    rows = get_task(TASK).make_prompts(num, seed, "test")
    seqs, starts = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        seqs.append(prompt + tokenizer(row["ground_truth"], add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id])
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((num, width), tokenizer.pad_token_id)
    mask = torch.zeros(num, width)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, start:len(seq)] = 1.0
    return ids, mask


def megatron_logits(model, ids):
    """Megatron's vocab-sharded logits (B, T, V_pad / tp), causal attention."""
    T = ids.shape[1]
    positions = torch.arange(T)[None].expand_as(ids)
    causal = torch.triu(torch.ones(1, 1, T, T, dtype=torch.bool), 1)   # True: masked
    with hfrl_megatron.cpu_forward():
        return model(ids, positions, causal)


def supervised_loss(model, ids, mask):
    """Megatron's vocab-parallel cross entropy of each next token, averaged over the answer tokens."""
    from megatron.core import tensor_parallel

    logits = megatron_logits(model, ids)[:, :-1]
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.contiguous(), ids[:, 1:].contiguous())
    weights = mask[:, 1:]
    return (losses * weights).sum() / weights.sum()


def megatron_steps(model, ids, mask, steps: int, lr: float = 0.05) -> float:
    """Plain SGD on the supervised loss; gradients averaged over the data-parallel ranks."""
    from megatron.core import parallel_state as mps

    dp_group, dp = mps.get_data_parallel_group(), mps.get_data_parallel_world_size()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        supervised_loss(model, ids, mask).backward()
        for param in model.parameters():
            if dp > 1:
                dist.all_reduce(param.grad, group=dp_group)
                param.grad /= dp
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float(supervised_loss(model, ids, mask))


def probe_log_probs(model, ids, vocab_size: int) -> torch.Tensor:
    """log p(ids[:, t+1]) over the true vocabulary (B, T-1), the sharded logits gathered over TP."""
    from megatron.core import parallel_state as mps

    group = mps.get_tensor_model_parallel_group()
    with torch.no_grad():
        local = megatron_logits(model, ids)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    logits = torch.cat(parts, dim=-1)[..., :vocab_size]
    return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|CUDA_DEVICE_MAX_CONNECTIONS).*")   # CPU
    from megatron.core import parallel_state as mps

    # ---- 1. a Megatron job ---------------------------------------------------------------------
    dist.init_process_group("gloo")
    mps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    tokenizer = get_task(TASK).tokenizer()
    model = build_model(args.tp, len(tokenizer)).eval()
    ids, mask = answer_batch(tokenizer, 16, seed=dist.get_rank() // args.tp)   # one batch per DP rank
    loss_start = float(supervised_loss(model, ids, mask).detach())
    loss_before = megatron_steps(model, ids, mask, args.megatron_steps)
    probe, _ = answer_batch(tokenizer, 4, seed=123)
    before = probe_log_probs(model, probe, len(tokenizer))

    # ---- 2. hfrl: GRPO on the same model, the same groups ------------------------------------
    config = load_config(None, [*RL_JOB, *hfrl_megatron.layout_overrides(roles=("actor", "ref")),
                                f"trainer.total_steps={args.steps}", f"trainer.run_dir={args.run_dir}",
                                *args.set])
    summary = hfrl_megatron.train(model, config)

    # ---- 3. Megatron again, on the RL-trained weights ------------------------------------------
    after = probe_log_probs(model, probe, len(tokenizer))
    loss_after_rl = float(supervised_loss(model, ids, mask).detach())
    loss_after = megatron_steps(model, ids, mask, args.megatron_steps)
    if dist.get_rank() == 0:
        report = {
            "megatron": {"tp": args.tp, "dp": mps.get_data_parallel_world_size(), "vocab_padded": model.vocab_size,
                         "loss_start": loss_start, "loss_before_rl": loss_before, "loss_after_rl": loss_after_rl,
                         "loss_after_more_steps": loss_after},
            "hfrl": {"steps": args.steps, "run_dir": args.run_dir,
                     "score_first": summary["first"].get("critic/score/mean"),
                     "score_last": summary["last"].get("critic/score/mean")},
            "probe_log_prob_change": float((after - before).abs().max()),
        }
        print(json.dumps(report), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**report, "probe_ids": probe.tolist(), "log_probs_before": before.tolist(),
                           "log_probs_after": after.tolist()}, f)
    mps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
