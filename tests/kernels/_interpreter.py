"""Running the Triton kernels' tests under the interpreter.

The interpreter must be on before triton is first imported (its own library functions are decorated
then), and other tests in this process may already have imported it. So ``test_triton_*`` tests take
the ``interpreted`` fixture of their file (built with ``require_interpreter``) and run only where
TRITON_INTERPRET=1 was set from the start; elsewhere ``tests/kernels/test_interpreter.py`` runs all of
them in one fresh pytest process with the flag set.
"""
import pytest

import hfrl_kernels


def require_interpreter(module, kernel: str):
    """``module``, when this process runs its Triton kernel ``kernel`` in the interpreter; else skip."""
    if not hfrl_kernels.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 from process start: see tests/kernels/test_interpreter.py")
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(getattr(module, kernel), InterpretedFunction)
    return module
