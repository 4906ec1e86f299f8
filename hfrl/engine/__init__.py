"""Training engine: micro-batches, pipeline/tensor/data parallel steps, optimizer, checkpoints.

- ``train_engine.TrainEngine`` / ``EngineConfig``: one role's model on this rank's (pp, tp, dp) share.
- ``checkpoint``: ``save_hf`` (merged HF export), ``save_checkpoint`` / ``load_checkpoint`` (resumable state).
- ``optim``: AdamW (DP or ZeRO-1), LR schedules, global clipping; ``microbatch``: splitting and balancing.
- ``config``: ``EngineConfig`` and ``OptimConfig`` without torch (what ``hfrl.config`` imports).

The torch-bound names load on first use (PEP 562), so that importing ``hfrl.engine.config`` does
not import torch.
"""
import importlib

from hfrl.engine.config import EngineConfig, OptimConfig

_LAZY = {"TrainEngine": "train_engine", "target_mask": "train_engine", "token_log_probs": "train_engine",
         "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "save_hf": "checkpoint"}
_SUBMODULES = ("checkpoint", "microbatch", "optim", "train_engine")

__all__ = ["EngineConfig", "OptimConfig", "TrainEngine", "load_checkpoint", "save_checkpoint", "save_hf",
           "target_mask", "token_log_probs"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _SUBMODULES:   # `hfrl.engine.checkpoint` after a bare `import hfrl.engine`, as before
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
