"""hfrl: HybridFlow without Ray."""
__version__ = "0.1.0"


def run(main, *args, **kwargs):
    """Run `main` on rank 0 as the single controller; every other rank serves (see
    hfrl.controller.entry.run)."""
    from hfrl.controller.entry import run as _run

    return _run(main, *args, **kwargs)
