"""The training engine's configuration: `EngineConfig` and its `OptimConfig`, with their checks.

Plain dataclasses, free of torch, so that `hfrl.config` and the `hfrl config` command load without
importing torch (about 2.5 s of every command-line process). ``hfrl.engine.train_engine`` and
``hfrl.engine.optim`` re-export them, as does ``hfrl.engine``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

DTYPE_NAMES = ("float32", "bfloat16")
"""EngineConfig.dtype values; hfrl.engine.train_engine.DTYPES maps each to its torch dtype."""
LR_SCHEDULES = ("constant", "cosine", "linear")
"""OptimConfig.schedule values (hfrl.engine.optim.SCHEDULES)."""
PP_SCHEDULES = ("1f1b", "gpipe")
"""EngineConfig.pp_schedule values: hfrl.distributed.pipeline_parallel.SCHEDULES, which imports torch
(tests/test_packaging.py checks that the two agree)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (reached at the end of warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon, added to the square root of the second moment."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices and embeddings; 1-D parameters (norms, biases) get none."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup: step s < warmup_steps uses lr * (s + 1) / warmup_steps."""
    total_steps: int = 0
    """Optimizer steps of the whole run; cosine/linear decay from warmup_steps to here (needs > warmup_steps)."""
    min_lr_ratio: float = 0.0
    """Final LR of cosine/linear decay as a fraction of lr (held after total_steps)."""
    schedule: str = "constant"
    """LR after warmup: 'constant', 'cosine' or 'linear'."""
    grad_clip: float = 1.0
    """Max global gradient norm (over every DP/TP/PP rank); 0 disables clipping (the norm is still computed)."""
    zero_stage: int = 0
    """0: every DP rank keeps full optimizer state (bucketed all-reduce); 1: state sharded over DP (ZeRO-1)."""
    bucket_mb: float = 25.0
    """Size of each gradient all-reduce bucket in MiB (zero_stage 0)."""
    skip_nonfinite: bool = True
    """Skip the step (on every rank) when the gradient norm is inf/NaN; if False such a step raises."""
    max_consecutive_skips: int = 10
    """Stop with FloatingPointError (on every rank) when this many optimizer steps in a row were
    skipped for a non-finite gradient norm: a run whose gradients stay inf/NaN would otherwise go
    on without learning. 0 never stops."""

    def validate(self, where: str = "optim") -> None:
        """Raise ValueError naming the bad field; run on every rank before the first collective.

        `where` is the section's key in the config (hfrl.config: "engine.optim", ...). NaN and inf
        are refused wherever a finite number is meant (NaN passes every `<` check).
        """
        if not 0 < self.lr < math.inf:
            raise ValueError(f"{where}.lr={self.lr!r} must be a positive finite number")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{where}.betas={self.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"{where}.eps={self.eps!r} must be a positive finite number")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"{where}.weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"{where}.schedule={self.schedule!r}: expected one of {LR_SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"{where}.schedule={self.schedule!r} decays from warmup_steps={self.warmup_steps} to "
                             f"total_steps={self.total_steps}: set total_steps to the run's number of optimizer "
                             "steps (> warmup_steps), or use schedule='constant'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{where}.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"{where}.grad_clip={self.grad_clip!r} must be a finite number >= 0 (0 disables clipping)")
        if isinstance(self.max_consecutive_skips, bool) or not isinstance(self.max_consecutive_skips, int) \
                or self.max_consecutive_skips < 0:
            raise ValueError(f"{where}.max_consecutive_skips={self.max_consecutive_skips!r} must be an integer >= 0 "
                             "(0: never stop for skipped steps)")
        if self.zero_stage not in (0, 1):
            raise ValueError(f"{where}.zero_stage={self.zero_stage!r}: hfrl implements 0 (plain DP) and 1 (ZeRO-1)")
        if not 0 < self.bucket_mb < math.inf:
            raise ValueError(f"{where}.bucket_mb={self.bucket_mb!r} must be a positive finite number")


@dataclass
class EngineConfig:
    model_path: str = ""
    """Local HF checkpoint folder (config.json + safetensors) the weights are read from."""
    value_head: bool = False
    """Build a ValueModel (critic, reward or cost model: one scalar per token) instead of a CausalLM."""
    init_missing_value_head: bool = False
    """With value_head: start the head from a seeded random init when the checkpoint has none
    (a critic made from an actor checkpoint); otherwise a missing score.weight is an error."""
    dtype: str = "float32"
    """Parameter dtype, 'float32' or 'bfloat16' (the optimizer keeps fp32 master weights). bfloat16
    is meant for CUDA; on CPU train in float32."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, LR schedule, gradient clipping, ZeRO stage."""
    num_micro_batches: int | None = None
    """Micro-batches per step on each DP rank (contiguous rows, at most one per row). Leave None to
    use max_tokens_per_micro_batch; both None means one micro-batch."""
    max_tokens_per_micro_batch: int | None = None
    """Dynamic batch size: micro-batches of at most this many real tokens (first-fit decreasing, a
    longer sequence goes alone). Give this or num_micro_batches, not both."""
    pack_sequences: bool = False
    """Pack each micro-batch into one row without padding (cu_seqlens); the outputs loss_fn sees
    are then (1, total, ...) and so are the micro-batch's per-token tensors."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: '1f1b' (at most pp micro-batches' activations per stage) or 'gpipe'."""
    activation_checkpointing: bool = False
    """Recompute every decoder layer's activations in backward instead of keeping them."""
    overlap_grad_reduce: bool | None = None
    """Start each bucket's DP gradient reduction during the last micro-batch's backward (DDP-style
    hooks). null: on for CUDA and on CPU (gloo dp2 step 0.96x of off, benchmarks/train_step.py)."""

    def validate(self, where: str = "engine", require_model_path: bool = True) -> None:
        """ValueError naming the bad field; run on every rank before the first collective.

        `where` is the section's key in the config (hfrl.config: "engine" or "roles.<role>.engine").
        """
        if require_model_path and not self.model_path:
            raise ValueError(f"{where}.model_path is empty: set it to a local HF checkpoint folder")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"{where}.dtype={self.dtype!r}: expected one of {sorted(DTYPE_NAMES)}")
        if self.num_micro_batches is not None and self.max_tokens_per_micro_batch is not None:
            raise ValueError(f"{where}.num_micro_batches={self.num_micro_batches} and {where}.max_tokens_per_micro_"
                             f"batch={self.max_tokens_per_micro_batch} are both set: micro-batch by count or by "
                             "token budget, set the other to null")
        for name in ("num_micro_batches", "max_tokens_per_micro_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}.{name}={value!r} must be a positive integer or null")
        if self.overlap_grad_reduce is not None and not isinstance(self.overlap_grad_reduce, bool):
            raise ValueError(f"{where}.overlap_grad_reduce={self.overlap_grad_reduce!r}: expected true, false or "
                             "null (null: the default, on)")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"{where}.pp_schedule={self.pp_schedule!r}: expected one of {PP_SCHEDULES}")
        self.optim.validate(f"{where}.optim")
