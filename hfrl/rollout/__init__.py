"""Generation inside the training ranks: paged KV cache, continuous batching, prefix-shared samples,
tensor-parallel generation (see ``engine.py``)."""
from hfrl.rollout.engine import RolloutEngine, RolloutOutput, Sample
from hfrl.rollout.sampling import SamplingParams

__all__ = ["RolloutEngine", "RolloutOutput", "Sample", "SamplingParams"]
