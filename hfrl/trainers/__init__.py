"""The RL trainers: one single-controller program per algorithm (its `step`), over the shared job
in base.py. `train(config)` runs the configured one inside `hfrl.run` (rank 0 drives, every other
rank serves)."""
from __future__ import annotations

from typing import Any

from hfrl.trainers.base import RLTrainer
from hfrl.trainers.grpo import (GRPOTrainer, ReinforcePlusPlusBaselineTrainer, ReinforcePlusPlusTrainer,
                                RLOOTrainer)
from hfrl.trainers.ppo import PPOTrainer
from hfrl.trainers.remax import ReMaxTrainer
from hfrl.trainers.safe_rlhf import SafeRLHFTrainer

TRAINERS: dict[str, type[RLTrainer]] = {cls.algorithm: cls for cls in (
    PPOTrainer, GRPOTrainer, RLOOTrainer, ReMaxTrainer, ReinforcePlusPlusTrainer,
    ReinforcePlusPlusBaselineTrainer, SafeRLHFTrainer)}


def run_trainer(config) -> dict[str, Any]:
    """Rank 0's program: build the configured trainer and fit it."""
    trainer = TRAINERS[config.algorithm.name](config)
    return trainer.fit()


def train(config) -> dict[str, Any] | None:
    """Run `config` (validated for training on every rank first) under hfrl.run; rank 0 returns the
    run's summary, the other ranks None."""
    import hfrl

    from hfrl.trainers.job import check_job

    check_job(config)
    return hfrl.run(run_trainer, config, config=config)


__all__ = ["GRPOTrainer", "PPOTrainer", "RLOOTrainer", "RLTrainer", "ReMaxTrainer", "ReinforcePlusPlusBaselineTrainer",
           "ReinforcePlusPlusTrainer", "SafeRLHFTrainer", "TRAINERS", "run_trainer", "train"]
