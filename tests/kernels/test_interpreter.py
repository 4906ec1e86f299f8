"""Every kernel's ``test_triton_*`` tests, in one fresh pytest process with TRITON_INTERPRET=1 (see
tests/kernels/_interpreter.py): the Triton kernels against their PyTorch references, on CPU."""
import os
import pathlib
import subprocess
import sys

import pytest

import hfrl_kernels

KERNEL_TESTS = pathlib.Path(__file__).resolve().parent


def test_triton_kernels_in_interpreter_subprocess():
    if hfrl_kernels.interpreting():
        pytest.skip("this process interprets: the test_triton_* tests run here")
    if not hfrl_kernels.triton_available():
        pytest.skip("triton is not importable")
    files = sorted(str(p) for p in KERNEL_TESTS.glob("test_*.py") if p.name != pathlib.Path(__file__).name)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files,
                          "-k", "test_triton_"],
                         cwd=KERNEL_TESTS.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]  # 5 if nothing was collected
    assert "SKIPPED" not in run.stdout and "." in run.stdout, run.stdout[-3000:]
