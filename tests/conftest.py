"""Shared test fixtures. Multi-rank tests start real processes: see tests/multiproc.py."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two cores: keep each test process to one intra-op thread so multi-rank tests don't thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
