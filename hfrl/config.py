"""The one configuration schema: typed dataclasses, a YAML file, `section.key=value` overrides.

Each field is documented by the string literal under it (shown by `hfrl config --describe`).
Loading checks every key, type and value (`Config.validate`) before anything else happens, so a
bad config fails the same way on every rank, in a dry run and in the launched run, before the
first collective; errors are one line naming the file (with line:column), key or value. Derived
values are computed where they are used and never written back into the config.

Sections are each component's own dataclass, defined once: `engine` is the training engine's
`EngineConfig` (model folder, dtype, micro-batching, and `engine.optim`, the `OptimConfig`).
A role's engine is `engine`, then value_head=true for the value models (critic, reward, cost),
then the role's own `roles.<role>.engine` overrides, key by key (`Config.engine_for`).
`hfrl.run` takes its config through `resolve_for_run`.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfrl.distributed.parallel_dims import GROUPINGS
from hfrl.distributed.resource_pool import MAX_WORLD_SIZE, PLACEMENT_MODES, ROLE_NAMES
from hfrl.engine.config import EngineConfig

# What hfrl.distributed.env.pick_backend accepts (tests/test_config.py checks they agree).
BACKENDS = ("auto", "gloo", "nccl")
MAX_TIMEOUT_S = 365 * 24 * 3600.0
VALUE_ROLES = ("critic", "reward", "cost")
ALGORITHMS = ("ppo", "grpo", "rloo", "remax", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
              "safe_rlhf")
CRITIC_ALGORITHMS = ("ppo", "safe_rlhf")
GROUP_ALGORITHMS = ("grpo", "rloo", "reinforce_plus_plus_baseline")
"""Algorithms whose advantages compare the responses of one prompt: they need rollout.n >= 2."""
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_CONTROLLERS = ("fixed", "adaptive")
KL_ESTIMATORS = ("k1", "k2", "k3")
TRUNCATIONS = ("error", "left", "right")

def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {expected}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {choices}")


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Process-group backend: 'auto' (NCCL on CUDA, else gloo), 'gloo' or 'nccl'."""
    timeout_s: float = 600.0
    """Timeout of every collective, in seconds (0 < timeout_s <= 365 days); a dead peer surfaces
    as an error after this long."""
    world_size: int | None = None
    """Expected number of ranks (1 to MAX_WORLD_SIZE = 2^20); the launcher's world size must
    match. None accepts any."""

    def validate(self) -> None:
        _choice("distributed.backend", self.backend, BACKENDS)
        _check(1 <= self.timeout_s <= MAX_TIMEOUT_S, "distributed.timeout_s", self.timeout_s,
               f"must be a finite number of seconds from 1 to {MAX_TIMEOUT_S:.0f} (365 days); "
               "below a millisecond torch.distributed rounds it to no time at all")
        _check(self.world_size is None or 1 <= self.world_size <= MAX_WORLD_SIZE,
               "distributed.world_size", self.world_size,
               f"must be between 1 and {MAX_WORLD_SIZE} ranks, or null to accept any")


@dataclass
class RoleConfig:
    enabled: bool = True
    """Whether the algorithm uses this role."""
    pool: str | None = None
    """Pool the role runs on, for placement.mode=custom (a key of placement.pools)."""
    pp: int = 1
    """Training pipeline-parallel degree."""
    tp: int = 1
    """Training tensor-parallel degree."""
    dp: int = -1
    """Training data-parallel degree; -1 infers it as pool size / (pp * tp)."""
    pg: int | None = None
    """Generation pipeline-parallel degree (actor only); None means pp."""
    tg: int | None = None
    """Generation tensor-parallel degree (actor only); None means tp. Must divide tp."""
    grouping: str = "hybridflow"
    """Generation grouping: 'hybridflow' (zero redundancy) or 'vanilla' (HybridFlow-V)."""
    engine: dict[str, Any] = field(default_factory=dict, metadata={"overrides": EngineConfig})
    """This role's overrides of the `engine` section, same keys, e.g. {model_path: /ckpt/critic,
    optim: {lr: 5.0e-6}}. Keys not given come from `engine`, except that critic, reward and cost
    start from value_head: true (see Config.engine_for)."""

    def validate(self, where: str) -> None:
        for name in ("pp", "tp", "pg", "tg"):
            value = getattr(self, name)
            _check(value is None and name in ("pg", "tg") or value is not None and value >= 1,
                   f"{where}.{name}", value, "must be a positive integer"
                   + (" or null (same as training)" if name in ("pg", "tg") else ""))
        _check(self.dp == -1 or self.dp >= 1, f"{where}.dp", self.dp,
               "must be -1 (infer from the pool size) or a positive integer")
        _choice(f"{where}.grouping", self.grouping, GROUPINGS)


def _role(enabled: bool = True) -> Any:
    return field(default_factory=lambda: RoleConfig(enabled=enabled))


@dataclass
class RolesConfig:
    actor: RoleConfig = _role()
    """The policy: trains, generates and computes log-probs."""
    critic: RoleConfig = _role()
    """The value model (PPO); disabled by critic-free algorithms."""
    ref: RoleConfig = _role()
    """The frozen reference policy for the KL penalty."""
    reward: RoleConfig = _role()
    """The reward model; disabled when rewards come from rules."""
    cost: RoleConfig = _role(enabled=False)
    """The cost model of Safe-RLHF."""
    rollout: RoleConfig = _role(enabled=False)
    """OpenRLHF's placement: generation on a pool of its own (placement.mode standalone or custom),
    from a copy of the actor's weights that the actor sends after every update. Its layout is
    roles.rollout.tg (tensor parallel) x the rest of its pool (replicas); it uses the actor's
    engine settings. Disabled: the actor generates on its own ranks (the 3D-HybridEngine)."""


@dataclass
class PlacementConfig:
    mode: str = "colocate"
    """'colocate' (every role on every rank), 'split' (actor+ref | critic+reward+cost),
    'standalone' (one pool per role) or 'custom' (placement.pools + roles.<role>.pool)."""
    pools: dict[str, int | list[int]] = field(default_factory=dict)
    """Pool sizes or explicit global rank lists. split: keys 'actor' and 'critic'; standalone:
    one key per enabled role; custom: any names. Empty means an even split of the world."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Prompt files (JSONL or Parquet, one prompt per row); leave empty to use `task`."""
    val_files: list[str] = field(default_factory=list)
    """Validation prompt files, evaluated every trainer.eval_every steps."""
    task: str | None = None
    """A built-in verifiable task (hfrl.data) that generates prompts and rule rewards, instead
    of train_files."""
    prompt_key: str = "prompt"
    """Column of the prompt text in the files."""
    tokenizer_path: str | None = None
    """Local tokenizer folder; None means the actor's engine.model_path."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped in the tokenizer folder (trusted folders only)."""
    max_prompt_length: int = 512
    """Prompt tokens kept per prompt (see truncation)."""
    truncation: str = "error"
    """A longer prompt: 'error', or cut on the 'left' or 'right'."""
    train_batch_size: int = 64
    """Prompts per training step (each gets rollout.n responses)."""
    shuffle: bool = True
    """Shuffle the prompts every epoch (seeded by trainer.seed)."""
    reward_fn: str | None = None
    """Rule reward 'module:function' (or 'file.py:function') called as fn(prompt, response,
    ground_truth) -> float on the ranks holding the rows; null: the built-in task's verifier, or
    the reward model when roles.reward is enabled."""
    task_train_size: int = 4096
    """Prompts generated for training by a built-in task."""
    val_size: int = 64
    """Held-out prompts of a built-in task evaluated every trainer.eval_every steps (greedy)."""

    def validate(self) -> None:
        if self.train_files and self.task is not None:
            raise ValueError(f"data.train_files={self.train_files!r} and data.task="
                             f"{self.task!r} are both set: give prompt files or a built-in task")
        _check(bool(self.prompt_key), "data.prompt_key", self.prompt_key, "must not be empty")
        _check(self.max_prompt_length >= 1, "data.max_prompt_length", self.max_prompt_length,
               "must be a positive number of tokens")
        _choice("data.truncation", self.truncation, TRUNCATIONS)
        _check(self.train_batch_size >= 1, "data.train_batch_size", self.train_batch_size,
               "must be a positive number of prompts")
        _check(self.reward_fn is None or ":" in self.reward_fn, "data.reward_fn", self.reward_fn,
               "must be 'module:function' or 'path/to/file.py:function'")
        for key in ("task_train_size", "val_size"):
            _check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key),
                   "must be a positive number of prompts")


@dataclass
class RolloutConfig:
    max_new_tokens: int = 256
    """Most tokens generated per response."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables."""
    n: int = 1
    """Responses sampled per prompt (GRPO needs more than one)."""
    max_num_seqs: int = 256
    """Sequences decoded at once per generation replica (continuous batching slots)."""
    block_size: int = 16
    """Tokens per KV-cache block (the paged cache's allocation unit)."""
    kv_cache_bytes: int | None = None
    """KV-cache size per rank in bytes; null takes kv_cache_fraction of free memory."""
    kv_cache_fraction: float = 0.5
    """Share of the device's free memory (MemAvailable on CPU) the KV cache takes, in (0, 1]."""
    max_model_len: int | None = None
    """Longest sequence (prompt + response) in tokens; null means the model's
    max_position_embeddings."""
    max_num_batched_tokens: int | None = None
    """Most prompt tokens prefilled in one step (a longer prompt still goes alone); null means
    max(max_model_len, 8192)."""
    seed: int | None = None
    """Sampling seed: each prompt of each step gets its own seed derived from it (fixed runs
    repeat exactly); null draws fresh seeds every call."""

    def validate(self) -> None:
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens,
               "must be a positive number of tokens")
        _check(0 <= self.temperature < math.inf, "rollout.temperature", self.temperature,
               "must be a finite number >= 0 (0: greedy)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", self.top_k,
               "must be -1 (disabled) or a positive integer")
        _check(self.n >= 1, "rollout.n", self.n, "must be a positive number of responses")
        _check(self.max_num_seqs >= 1, "rollout.max_num_seqs", self.max_num_seqs,
               "must be a positive integer")
        _check(self.block_size >= 1, "rollout.block_size", self.block_size,
               "must be a positive number of tokens (16 is usual)")
        _check(self.kv_cache_bytes is None or self.kv_cache_bytes >= 1, "rollout.kv_cache_bytes",
               self.kv_cache_bytes, "must be null or a positive number of bytes")
        _check(0 < self.kv_cache_fraction <= 1, "rollout.kv_cache_fraction", self.kv_cache_fraction,
               "must be in (0, 1]")
        _check(self.max_model_len is None or self.max_model_len >= 2, "rollout.max_model_len",
               self.max_model_len, "must be null or at least 2 tokens")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "rollout.max_num_batched_tokens", self.max_num_batched_tokens,
               "must be null or a positive number of tokens")
        _check(self.seed is None or 0 <= self.seed < 2 ** 62, "rollout.seed", self.seed,
               "must be null or an integer in [0, 2**62)")


@dataclass
class HybridConfig:
    mode: str | None = None
    """How the actor's weights move between training and generation: 'hybridflow' (all-gather inside
    micro-DP groups, nothing stored twice), 'hybridflow_v' (gather over the training model-parallel
    group; needs roles.actor.grouping=vanilla) or 'ds_chat' (gather the whole model over the role: the
    DeepSpeed-Chat baseline). null follows roles.actor.grouping: hybridflow, or hybridflow_v for vanilla."""
    bucket_mb: float = 64.0
    """Size of each all-gather bucket in MiB (hybridflow mode); the send buffer is one bucket."""
    offload_optimizer: bool = False
    """Move AdamW's moments (and bf16's fp32 masters) to host memory while generating."""

    def validate(self) -> None:
        from hfrl.hybrid_engine.accounting import MODES

        if self.mode is not None:
            _choice("hybrid.mode", self.mode, MODES)
        _check(math.isfinite(self.bucket_mb) and self.bucket_mb >= 1 / 1024, "hybrid.bucket_mb", self.bucket_mb,
               "must be a finite number of MiB, at least 1/1024 (1 KiB)")


@dataclass
class AlgorithmConfig:
    name: str = "ppo"
    """The trainer: 'ppo', 'grpo', 'rloo', 'remax', 'reinforce_plus_plus',
    'reinforce_plus_plus_baseline' or 'safe_rlhf'."""
    gamma: float = 1.0
    """Discount factor of the advantage estimate, in [0, 1]."""
    lam: float = 1.0
    """GAE lambda, in [0, 1]."""
    kl_coef: float = 0.001
    """Weight of the KL divergence to the reference policy; 0 disables it."""
    kl_estimator: str = "k1"
    """Per-token KL estimate: 'k1' (log ratio), 'k2' (squared log ratio / 2) or 'k3' (low
    variance)."""
    kl_in_reward: bool = True
    """Subtract the KL from the reward (PPO, ReMax); false adds it to the loss (GRPO's way)."""
    kl_ctrl: str = "fixed"
    """KL coefficient controller: 'fixed' or 'adaptive' (Ziegler et al.: steers the KL to
    kl_target over kl_horizon samples)."""
    kl_target: float = 0.1
    """Target KL per sequence of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (samples) of the adaptive controller."""
    loss_agg_mode: str = "token-mean"
    """How a loss over tokens is averaged: 'token-mean', 'seq-mean-token-sum' or
    'seq-mean-token-mean'."""
    dual_clip_c: float | None = 3.0
    """Dual-clip bound (> 1) on the loss of negative-advantage tokens; null disables it."""
    clip_ratio_low: float = 0.2
    """Policy ratio clipped below at 1 - clip_ratio_low, in (0, 1)."""
    clip_ratio_high: float = 0.2
    """Policy ratio clipped above at 1 + clip_ratio_high (> 0)."""
    value_clip: float = 0.5
    """Critic predictions clipped to old value +- value_clip; 0 disables clipping."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus in the actor loss."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    mini_batch_size: int = 16
    """Prompts (each with its rollout.n responses) per optimizer step; must divide
    data.train_batch_size."""
    group_norm_by_std: bool = True
    """GRPO: divide each group's advantages by their standard deviation (false: only subtract
    the mean)."""
    cost_limit: float = 0.0
    """Safe-RLHF: the expected cost the policy must stay below."""
    lagrangian_lr: float = 0.1
    """Safe-RLHF: learning rate of the Lagrange multiplier."""
    lagrangian_init: float = 1.0
    """Safe-RLHF: starting Lagrange multiplier (>= 0)."""

    def validate(self) -> None:
        _choice("algorithm.name", self.name, ALGORITHMS)
        _choice("algorithm.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("algorithm.kl_ctrl", self.kl_ctrl, KL_CONTROLLERS)
        _choice("algorithm.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check(self.dual_clip_c is None or 1 < self.dual_clip_c < math.inf, "algorithm.dual_clip_c",
               self.dual_clip_c, "must be null (off) or a finite number > 1")
        _check(0 < self.kl_target < math.inf, "algorithm.kl_target", self.kl_target,
               "must be a positive finite number")
        _check(self.kl_horizon >= 1, "algorithm.kl_horizon", self.kl_horizon, "must be >= 1")
        if not self.kl_in_reward and self.kl_coef > 0 and self.kl_estimator == "k1":
            raise ValueError("algorithm.kl_estimator='k1' with algorithm.kl_in_reward=false: as a loss term the "
                             "k1 estimate (log-ratio) has zero expected gradient, so it would not regularise "
                             "at all; use kl_estimator=k3 (low variance) or k2, or keep the KL in the reward")
        for key, lo, hi, closed in (("gamma", 0, 1, True), ("lam", 0, 1, True),
                                    ("clip_ratio_low", 0, 1, False)):
            value = getattr(self, key)
            ok = lo <= value <= hi if closed else lo < value < hi
            _check(ok, f"algorithm.{key}", value, f"must be in {'[' if closed else '('}{lo}, {hi}"
                                                  f"{']' if closed else ')'}")
        for key in ("kl_coef", "value_clip", "entropy_coef", "lagrangian_init"):
            value = getattr(self, key)
            _check(0 <= value < math.inf, f"algorithm.{key}", value, "must be a finite number >= 0")
        for key in ("clip_ratio_high", "lagrangian_lr"):
            value = getattr(self, key)
            _check(0 < value < math.inf, f"algorithm.{key}", value,
                   "must be a positive finite number")
        _check(math.isfinite(self.cost_limit), "algorithm.cost_limit", self.cost_limit,
               "must be a finite number")
        for key in ("ppo_epochs", "mini_batch_size"):
            _check(getattr(self, key) >= 1, f"algorithm.{key}", getattr(self, key),
                   "must be a positive integer")


@dataclass
class TrainerConfig:
    total_steps: int = 100
    """Training steps (one rollout batch each). engine.optim.total_steps counts optimizer steps:
    total_steps * ppo_epochs * mini-batches per step."""
    save_every: int = 0
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    eval_every: int = 0
    """Evaluate on data.val_files every this many steps; 0 disables."""
    log_every: int = 1
    """Append metrics to metrics.jsonl every this many steps."""
    run_dir: str = "runs/hfrl"
    """Run directory: resolved config, metrics.jsonl, checkpoints, figures."""
    seed: int = 0
    """Seed of data order, sampling and any random init, in [0, 2^63)."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir if there is one."""
    export_hf: bool = True
    """At the end, write the actor as a merged HF checkpoint (and its tokenizer) to run_dir/actor_hf."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 (reward, KL, throughput)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in run_dir/checkpoints; older ones are deleted (0 keeps all)."""

    def validate(self) -> None:
        _check(self.total_steps >= 1, "trainer.total_steps", self.total_steps,
               "must be a positive number of steps")
        for key in ("save_every", "eval_every"):
            _check(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key),
                   "must be >= 0 (0: off)")
        _check(self.log_every >= 1, "trainer.log_every", self.log_every, "must be >= 1")
        _check(bool(self.run_dir), "trainer.run_dir", self.run_dir, "must not be empty")
        _check(0 <= self.seed < 2 ** 63, "trainer.seed", self.seed, "must be in [0, 2^63)")
        _check(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", self.keep_checkpoints,
               "must be >= 0 (0 keeps all)")


@dataclass
class InitModelConfig:
    """The fresh model a run starts from when engine.model_path is empty and data.task is set: a
    Llama of this shape with the task tokenizer's vocabulary, random weights (seeded), written to
    run_dir/init_model and used by every role."""

    hidden_size: int = 64
    """Width of the model."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA); must divide num_heads."""
    intermediate_size: int = 256
    """MLP width."""
    max_position_embeddings: int = 64
    """Longest sequence (prompt + response) in tokens."""
    seed: int = 0
    """Seed of the random weights."""

    def validate(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "max_position_embeddings"):
            _check(getattr(self, key) >= 1, f"init_model.{key}", getattr(self, key),
                   "must be a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "init_model.hidden_size", self.hidden_size,
               f"must be a multiple of init_model.num_heads={self.num_heads}")
        _check(self.num_heads % self.num_kv_heads == 0, "init_model.num_kv_heads", self.num_kv_heads,
               f"must divide init_model.num_heads={self.num_heads}")


@dataclass
class Config:
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How processes find each other."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Which ranks each role runs on."""
    roles: RolesConfig = field(default_factory=RolesConfig)
    """Each role's parallel layout (and engine overrides)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Every role's model folder, dtype, micro-batching and optimizer (hfrl.engine's EngineConfig);
    roles.<role>.engine overrides it per role."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and tokenizer."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation: lengths, sampling, samples per prompt."""
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    """The actor's switch between its training and generation layouts (the 3D-HybridEngine)."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The RL algorithm and its coefficients."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Length of the run, checkpoints, evaluation, run directory, seed."""
    init_model: InitModelConfig = field(default_factory=InitModelConfig)
    """Shape of the fresh model used when engine.model_path is empty and data.task is set."""

    def engine_for(self, role: str) -> EngineConfig:
        """The role's engine: `engine`, then value_head=true for critic/reward/cost, then
        `roles.<role>.engine`. A new object; the config is not changed."""
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLE_NAMES}")
        if role == "rollout":   # a copy of the actor's model
            return self.engine_for("actor")
        base = self.engine
        if role in VALUE_ROLES:
            base = dataclasses.replace(base, value_head=True)
        return from_dict(EngineConfig, getattr(self.roles, role).engine, f"roles.{role}.engine",
                         base=base)

    def validate(self, training: bool = False) -> None:
        """ValueError/TypeError naming the key and value. Pure: run it on every rank before the
        first collective. `training` also checks what a training run reads: every enabled role's
        model folder, a prompt source, and the roles the algorithm needs."""
        self.distributed.validate()
        _choice("placement.mode", self.placement.mode, PLACEMENT_MODES)
        self.engine.validate("engine", require_model_path=False)
        for role in ROLE_NAMES:
            getattr(self.roles, role).validate(f"roles.{role}")
            if role == "rollout" and self.roles.rollout.engine:
                raise ValueError(f"roles.rollout.engine={self.roles.rollout.engine!r}: the rollout holds a "
                                 "copy of the actor's weights and uses the actor's engine settings; set "
                                 "them under roles.actor.engine (or engine) instead")
            if getattr(self.roles, role).engine:
                self.engine_for(role).validate(f"roles.{role}.engine", require_model_path=False)
        for section in (self.data, self.rollout, self.hybrid, self.algorithm, self.trainer,
                        self.init_model):
            section.validate()
        from hfrl.hybrid_engine.accounting import MODE_GROUPING

        needs = MODE_GROUPING.get(self.hybrid.mode or "")
        if needs is not None and self.roles.actor.grouping != needs:
            raise ValueError(f"hybrid.mode={self.hybrid.mode!r} generates with the {needs!r} grouping but "
                             f"roles.actor.grouping={self.roles.actor.grouping!r}; set roles.actor.grouping="
                             f"{needs} or pick another hybrid.mode")
        if self.roles.rollout.enabled:
            self._validate_rollout()
        if self.data.train_batch_size % self.algorithm.mini_batch_size:
            raise ValueError(f"algorithm.mini_batch_size={self.algorithm.mini_batch_size} must "
                             f"divide data.train_batch_size={self.data.train_batch_size} (each "
                             "step's prompts are cut into mini-batches)")
        if training:
            self._validate_training()

    def _validate_rollout(self) -> None:
        """Settings of the actor's own generation mean nothing once the rollout role generates."""
        actor = self.roles.actor
        for key, value, default in (("hybrid.mode", self.hybrid.mode, None),
                                    ("hybrid.offload_optimizer", self.hybrid.offload_optimizer, False),
                                    ("roles.actor.tg", actor.tg, None), ("roles.actor.pg", actor.pg, None)):
            if value != default:
                raise ValueError(f"{key}={value!r} sets up the actor's own generation (the hybrid engine), "
                                 f"but roles.rollout.enabled=true generates on the rollout's pool: remove "
                                 f"{key}, or set roles.rollout.enabled=false to generate on the actor")

    def _validate_training(self) -> None:
        enabled = [r for r in ROLE_NAMES if getattr(self.roles, r).enabled]
        name = self.algorithm.name
        needs = {"ppo": ("critic",), "safe_rlhf": ("critic", "reward", "cost")}.get(name, ())
        for role in needs:
            if role not in enabled:
                raise ValueError(f"algorithm.name={name!r} needs a {role}: set "
                                 f"roles.{role}.enabled=true")
        if name not in CRITIC_ALGORITHMS and "critic" in enabled:
            raise ValueError(f"algorithm.name={name!r} trains without a critic: set "
                             "roles.critic.enabled=false")
        if name in GROUP_ALGORITHMS and self.rollout.n < 2:
            raise ValueError(f"rollout.n={self.rollout.n}: algorithm.name={name!r} compares the "
                             "responses to each prompt, it needs rollout.n >= 2")
        if "cost" in enabled and name != "safe_rlhf":
            raise ValueError(f"roles.cost is enabled but algorithm.name={name!r} does not use a cost "
                             "model: set roles.cost.enabled=false or algorithm.name=safe_rlhf")
        if self.algorithm.kl_coef > 0 and "ref" not in enabled:
            raise ValueError(f"algorithm.kl_coef={self.algorithm.kl_coef} needs the reference policy: "
                             "set roles.ref.enabled=true, or algorithm.kl_coef=0")
        fresh = self.data.task is not None   # an empty model_path means init_model's fresh model
        for role in ("reward", "cost"):
            if role in enabled and fresh and not self.engine_for(role).model_path:
                raise ValueError(f"roles.{role} is enabled but has no model: a fresh random {role} "
                                 f"model scores nothing; set roles.{role}.engine.model_path, or "
                                 f"roles.{role}.enabled=false to use the task's rule reward")
        missing = [r for r in enabled if not self.engine_for(r).model_path and not fresh]
        if missing:
            raise ValueError(f"engine.model_path is empty but roles {', '.join(missing)} need a "
                             "model: set engine.model_path (and roles.<role>.engine.model_path "
                             "for a role with its own model)")
        for role in enabled:
            path = self.engine_for(role).model_path
            if not path:
                continue
            key = (f"roles.{role}.engine.model_path" if "model_path" in
                   getattr(self.roles, role).engine else "engine.model_path")
            _check((Path(path) / "config.json").is_file(), key, path,
                   "is not a model folder (no config.json)")
        if not self.data.train_files and self.data.task is None:
            raise ValueError("data.train_files and data.task are both empty: give prompt files "
                             "or a built-in task")
        for key in ("train_files", "val_files"):
            for i, path in enumerate(getattr(self.data, key)):
                _check(Path(path).is_file(), f"data.{key}[{i}]", path, "is not a file")
        has_rm = "reward" in enabled
        if not has_rm and self.data.reward_fn is None and self.data.task is None:
            raise ValueError("no reward: enable roles.reward (a reward model), set data.reward_fn "
                             "('module:function') or use a built-in data.task")
        if has_rm and self.data.reward_fn is not None:
            raise ValueError(f"roles.reward is enabled and data.reward_fn={self.data.reward_fn!r} is "
                             "set: give one source of rewards (roles.reward.enabled=false for rules)")


# ---------------------------------------------------------------------------------------------
# Building typed values from plain data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` (from YAML) to type `tp`, or raise TypeError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping for section {tp.__name__}, "
                            f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:   # 10**400: as 1e400 reads, so validation names it inf
            return math.copysign(math.inf, value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; users write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise TypeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r}")
    return value


def from_dict(cls: type, data: dict, path: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict over `base` (default: `cls()`).

    Sections given partially keep their other defaults; unknown keys get a did-you-mean.
    """
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(path + '.' if path else '') + close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{where}'{hint} (valid keys under "
                             f"'{path or '<root>'}': {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"{where}: expected a mapping for section "
                                f"{type(current).__name__}, got {type(value).__name__} {value!r}")
            setattr(obj, key, from_dict(type(current), value, where, base=current))
        elif "overrides" in fields[key].metadata:   # merged key by key into the base's
            setattr(obj, key, _typed_overrides(fields[key].metadata["overrides"],
                                               _merged(current, value), where))
        else:
            setattr(obj, key, _coerce(value, hints[key], where))
    return obj


def _merged(base: Any, update: Any) -> Any:
    """`update` over `base`, recursively where both are mappings."""
    if not isinstance(base, dict) or not isinstance(update, dict):
        return update
    return {**base, **{k: _merged(base.get(k), v) for k, v in update.items()}}


def _typed_overrides(cls: type, data: Any, path: str) -> dict[str, Any]:
    """A partial `cls` section: only the keys given, each checked and converted to its type."""
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping of {cls.__name__} keys, got "
                        f"{type(data).__name__} {data!r}")
    full = from_dict(cls, data, path)        # unknown keys and wrong types fail here
    return {key: (_typed_overrides(type(getattr(full, key)), value, f"{path}.{key}")
                  if dataclasses.is_dataclass(getattr(full, key)) else getattr(full, key))
            for key, value in data.items()}


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'roles.actor.tp=2' -> (['roles', 'actor', 'tp'], 2). The value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: empty key part")
    value = _load_yaml(raw, f"override {text!r}", in_file=False) if raw != "" else ""
    return key.split("."), value


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _load_yaml(text: str, source: str, in_file: bool = True) -> Any:
    """yaml.safe_load, but a duplicate key is an error and every error is one ValueError line:
    'FILE:LINE:COL: problem' (in_file) or 'SOURCE: problem at column COL'."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as err:   # a control character: found before any parsing
        column = err.position - text.rfind("\n", 0, err.position) - 1
        mark = yaml.Mark(source, err.position, text.count("\n", 0, err.position), column, None,
                         None)
        raise ValueError(_at(source, mark, in_file) + f"invalid YAML: character "
                         f"{chr(err.character)!r} is not allowed ({err.reason})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, source, in_file)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces; replace the tabs)"
        if err.context and err.problem and err.context_mark:
            problem += f" ({err.context} on line {err.context_mark.line + 1})"
        raise ValueError(_at(source, mark, in_file) + f"invalid YAML: {problem}") from None
    except yaml.YAMLError as err:   # any other error, without a mark
        raise ValueError(f"{source}: invalid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def _at(source: str, mark: Any, in_file: bool) -> str:
    if mark is None:
        return f"{source}: "
    if in_file:
        return f"{source}:{mark.line + 1}:{mark.column + 1}: "
    return f"{source}: at column {mark.column + 1}: "


def _refuse_duplicate_keys(root: yaml.Node, source: str, in_file: bool) -> None:
    """PyYAML keeps the last of two equal keys silently (a second `roles:` block drops the
    first); walk the node tree, in document order, and refuse them naming the dotted key."""
    stack, seen = [(root, "")], set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:        # aliases share nodes
            continue
        seen.add(id(node))
        children = []
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or \
                        not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = f"{path}.{key_node.value}" if path else key_node.value
                if key_node.value in first:
                    raise ValueError(
                        _at(source, key_node.start_mark, in_file) + f"duplicate key '{key}' "
                        f"(first on line {first[key_node.value] + 1}); give each key once")
                first[key_node.value] = key_node.start_mark.line
                children.append((value_node, key))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))


def _read_config_file(path: str | Path) -> dict:
    if str(path) == "":
        raise ValueError("config file path is empty (''): give a YAML file, or no argument for "
                         "the defaults")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.exists():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise ValueError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                         "save the file as UTF-8") from None
    data = _load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping at the top level, got "
                        f"{type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                cls: type = Config, base: Any = None, training: bool = False):
    """Defaults (or `base`) <- YAML file <- `section.key=value` overrides, then validated.

    Raises ValueError/TypeError with one line naming the file (line:column), key or value.
    """
    data = _read_config_file(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    config = from_dict(cls, data, base=base)
    if isinstance(config, Config):
        config.validate(training=training)
    return config


def resolve_for_run(config: Config | str | Path | None = None, overrides: Sequence[str] = (), *,
                    world_size: int | None = None, training: bool = False) -> Config:
    """The config a launched run uses, checked on every rank before its first collective.

    `config` is a Config (overrides apply over it; it is not changed), a YAML path, or None for
    the defaults. The result is validated (`Config.validate(training)`) and its placement plan
    is built against `world_size` (default: the launcher's, from the environment; no collective
    is made). Errors are ValueError/TypeError, the same on every rank. The run then initialises
    with `distributed.backend` and `distributed.timeout_s`.
    """
    from hfrl.distributed.resource_pool import plan_for_config

    if isinstance(config, Config):
        resolved = load_config(None, overrides, base=config, training=training)
    elif config is None or isinstance(config, (str, Path)):
        resolved = load_config(config, overrides, training=training)
    else:
        raise TypeError(f"config: expected a Config, a YAML path or None, got "
                        f"{type(config).__name__}")
    if world_size is None:
        from hfrl.distributed.env import detect_env

        world_size = detect_env().world_size
    plan_for_config(resolved, world_size)
    return resolved


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Field documentation (the string literal under each field)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf key: 'key (type, default): doc'."""
    lines = []
    defaults = cls() if defaults is None else defaults
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{key}: {docs.get(f.name, '')}")
            lines += describe(type(value), key + ".", value)
        else:
            lines.append(f"  {key} ({_type_name(hints[f.name])}, default {value!r}): "
                         f"{docs.get(f.name, '')}")
    return lines
