"""Shared setup of the attention kernel tests: the interpreter guard, the device and the dtype grid.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before anything imports
triton). A kernel module imported earlier without it holds compiled kernels the interpreter cannot run,
so :func:`interpreted` reloads it; if triton itself was imported too early there is no fix at this point,
and it says so.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")]),
]


def interpreted(module: ModuleType, kernel_name: str) -> ModuleType:
    """``module`` with its ``kernel_name`` runnable here (reloaded under the interpreter on CPU)."""
    if torch.cuda.is_available():
        return module
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set (e.g. by torch._dynamo), so tl.* helpers "
            "are compiled functions the interpreter cannot call: set the variable before importing torch._dynamo"
        )
    if not isinstance(getattr(module, kernel_name), InterpretedFunction):
        module = importlib.reload(module)  # imported earlier by another module without the interpreter
    return module
