"""The 3D-HybridEngine: the actor's weights moved between its training and generation layouts.

``HybridEngine`` (engine.py) does the transitions; ``plan`` is the arithmetic of what moves,
``layers`` the generation layers that compute on training shards where they lie, ``accounting`` the
paper's Table 2 formulas that ``hfrl layout`` prints and the tests hold the counters to.
"""
__all__ = ["HybridEngine"]


def __getattr__(name: str):
    # HybridEngine (torch) loads on first use: hfrl.config reads accounting's modes without torch.
    if name == "HybridEngine":
        from hfrl.hybrid_engine.engine import HybridEngine
        return HybridEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
