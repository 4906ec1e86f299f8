"""Training engine: micro-batches, pipeline/tensor/data parallel steps, optimizer, checkpoints.

- ``train_engine.TrainEngine`` / ``EngineConfig``: one role's model on this rank's (pp, tp, dp) share.
- ``checkpoint``: ``save_hf`` (merged HF export), ``save_checkpoint`` / ``load_checkpoint`` (resumable state).
- ``optim``: AdamW (DP or ZeRO-1), LR schedules, global clipping; ``microbatch``: splitting and balancing.
"""
from hfrl.engine.checkpoint import load_checkpoint, save_checkpoint, save_hf
from hfrl.engine.optim import OptimConfig
from hfrl.engine.train_engine import EngineConfig, TrainEngine, target_mask, token_log_probs

__all__ = ["EngineConfig", "OptimConfig", "TrainEngine", "load_checkpoint", "save_checkpoint", "save_hf",
           "target_mask", "token_log_probs"]
