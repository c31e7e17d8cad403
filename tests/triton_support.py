"""Loading loradock's Triton modules with their kernels interpreted (on the CPU, fp32) or compiled (CUDA).

@triton.jit reads TRITON_INTERPRET when the decorator runs, so a module is reloaded whenever the wanted mode is not
the one it was built in. The operators of `kernels/custom_ops.py` find the modules when called, so they follow.
"""

from __future__ import annotations

import importlib

import pytest

TRITON_MODULES = ("loradock.kernels.triton_lora", "loradock.kernels.triton_attention")


def triton_modules(interpret: bool) -> dict[str, object]:
    """{short name: module} with every Triton module in the wanted mode."""
    from triton.runtime.interpreter import InterpretedFunction

    modules = {}
    with pytest.MonkeyPatch.context() as patch:
        if interpret:
            patch.setenv("TRITON_INTERPRET", "1")
        else:
            patch.delenv("TRITON_INTERPRET", raising=False)
        for name in TRITON_MODULES:
            module = importlib.import_module(name)
            kernel = next(v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel"))
            if isinstance(kernel, InterpretedFunction) != interpret:
                module = importlib.reload(module)
            modules[name.rsplit(".", 1)[1]] = module
    return modules
