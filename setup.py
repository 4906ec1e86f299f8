"""hfrl: HybridFlow without Ray.

Two packages are installed: ``hfrl`` (from ``hfrl/``) and ``hfrl_kernels`` (the Triton kernels, from
the top-level ``kernels/`` folder; deliberately not importable as ``kernels``, a PyPI name that
transformers probes for).
"""
import platform

from setuptools import setup

# triton ships wheels for Linux x86_64/aarch64 only; everything in hfrl imports and runs without
# it (the kernels fall back to their PyTorch references).
_triton = "triton>=3.0; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'"

# Tested on 0.16.1 (tests/integrations); 0.16.x patch releases keep the TransformerConfig and the
# GPTModel state-dict names hfrl maps (test_megatron_config checks every config field is classified).
_megatron = "megatron-core>=0.16.1,<0.17; python_version < '3.12'"

setup(
    name="hfrl",
    version="0.1.0",
    description="HybridFlow without Ray: single-controller RL/RLHF for LLMs under torchrun, srun or mpirun",
    python_requires=">=3.10",
    packages=[
        "hfrl",
        "hfrl.distributed",
        "hfrl.controller",
        "hfrl.models",
        "hfrl.engine",
        "hfrl.rollout",
        "hfrl.hybrid_engine",
        "hfrl.algorithms",
        "hfrl.workers",
        "hfrl.trainers",
        "hfrl.mapping",
        "hfrl.data",
        "hfrl.integrations",
        "hfrl_kernels",
    ],
    package_dir={"hfrl_kernels": "kernels"},
    package_data={"hfrl_kernels": ["csrc/*.c"]},  # compiled on first use (hfrl_kernels.native)
    install_requires=[
        # The torch pin is applied by scripts/setup.sh (a CPU build where no GPU is present);
        # here any torch >= 2.4 is accepted so an existing install is left alone.
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "pyyaml",
        "tqdm",
        "matplotlib",   # the run's curves (PNG) at the end of hfrl train
        _triton,
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout", "hypothesis", "mpi4py>=3.1",
                 "mpich; platform_system == 'Linux'", "pyarrow", _megatron],
        "parquet": ["pyarrow"],   # Parquet prompt files
        # hfrl.integrations.megatron; megatron-core 0.17+ needs Python 3.12, 0.16.1 runs on 3.10-3.11.
        "megatron": [_megatron],
    },
    entry_points={"console_scripts": ["hfrl = hfrl.cli:main"]},
)
