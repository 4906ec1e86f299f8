"""The 3D-HybridEngine: the actor's weights moved between its training and generation layouts.

``HybridEngine`` (engine.py) does the transitions; ``plan`` is the arithmetic of what moves,
``layers`` the generation layers that compute on training shards where they lie, ``accounting`` the
paper's Table 2 formulas that ``hfrl layout`` prints and the tests hold the counters to.
"""
from hfrl.hybrid_engine.engine import HybridEngine

__all__ = ["HybridEngine"]
