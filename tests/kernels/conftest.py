"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET=1`` is set here, before Triton is first imported when this folder is
run on its own (``pytest tests/kernels``), so Liger-Kernel's kernels (which call Triton's
own jitted helpers) can be interpreted too. slimtune's kernels do not depend on it:
``slimtune.kernels.dispatch`` loads them in interpreter mode for CPU tensors whenever
``force_triton()`` is active.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests import their shared helpers as ``kernel_helpers``; under pytest's importlib mode
# this folder is not on sys.path, so register the module here.
_spec = importlib.util.spec_from_file_location("kernel_helpers", Path(__file__).with_name("kernel_helpers.py"))
kernel_helpers = importlib.util.module_from_spec(_spec)
sys.modules["kernel_helpers"] = kernel_helpers
_spec.loader.exec_module(kernel_helpers)

import pytest  # noqa: E402
import torch  # noqa: E402

from slimtune.kernels import force_triton  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "uses_compile: the test runs torch.compile (bitsandbytes' own compile stays on)")


@pytest.fixture
def triton_path():
    """Inside the test, every slimtune op on CPU tensors runs its Triton kernel (interpreted)."""
    with force_triton():
        yield




@pytest.fixture(autouse=True)
def _eager_bitsandbytes(request):
    """bitsandbytes' CPU dequantization of odd shapes goes through ``torch.compile`` (about
    10 s per new shape on this machine); run it eagerly (same arithmetic) except in the
    tests that exercise ``torch.compile`` themselves (marked ``uses_compile``)."""
    if "uses_compile" in request.keywords:
        yield
        return
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _language_namespaces():
    """Where Triton's interpreter rebinds ``triton.language`` builtins while a kernel runs."""
    if importlib.util.find_spec("triton") is None:
        return []
    import triton.language as tl

    # tensor_descriptor_base is newer than the oldest Triton the extras allow (3.0).
    spaces = (tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None))
    return [ns for ns in spaces if ns is not None]


@pytest.fixture(autouse=True)
def _triton_language_restored():
    """Undo what Triton's interpreter leaves patched after a test.

    Triton 3.9's interpreter rebinds the ``triton.language`` builtins for the length of a kernel
    and restores them, but a device function called from it (``InterpretedFunction.__call__``,
    e.g. ``tl.standard``'s helpers inside Liger's cross-entropy kernel) rebinds
    ``triton.language.core``'s module functions again and never restores them. Any later
    ``triton.compile`` in the same process (``test_compile_sm90``) then runs the interpreter's
    builder on real IR values and fails, unless Triton's on-disk cache already holds the result.
    Nothing in slimtune can fix that; the tests put the namespaces back as they found them."""
    before = [(ns, dict(vars(ns))) for ns in _language_namespaces()]
    yield
    for ns, saved in before:
        for name in [n for n in vars(ns) if n not in saved]:
            delattr(ns, name)
        for name, value in saved.items():
            if vars(ns).get(name) is not value:
                setattr(ns, name, value)
