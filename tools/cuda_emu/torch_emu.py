"""Routes epic_ext's ops to their CUDA implementations emulated on the CPU (tools/cuda_emu), for the op tests.

The emulated library registers the unmodified csrc/cuda code under epic_ext's CUDA dispatch key, exactly as the real
build does. A CPU torch has no CUDA tensors, so nothing would ever dispatch there on its own: inside
`kernels_on_cpu()` a dispatch mode sends every epic_ext op called on plain CPU tensors to its CUDA kernel instead
(`OpOverload.redispatch` with the CUDA key). Autograd, register_fake and opcheck's fake/compiled paths run above
or beside the mode as usual; only the real kernel call is swapped. Everything else (aten ops, the references)
runs on the CPU unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import pathlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
_library: ctypes.CDLL | None = None


def load(path: str | pathlib.Path) -> None:
    """Loads the emulated kernels (after epic_ext, whose _C defines the op schemas)."""
    global _library
    import epic_ext  # noqa: F401, PLC0415  (defines the schemas the library implements)

    if _library is None:
        _library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        _library.cuda_emu_error.restype = ctypes.c_char_p
        _library.cuda_emu_error.argtypes = [ctypes.c_int]
        _library.cuda_emu_error_count.restype = ctypes.c_int
        _library.cuda_emu_launch_count.restype = ctypes.c_ulonglong


def launch_count() -> int:
    """Kernels the emulator has run since it was loaded."""
    assert _library is not None, "cuda_emu not loaded"
    return _library.cuda_emu_launch_count()


def error_count() -> int:
    """Errors the emulator has reported since it was loaded (deadlocks, divergent barriers, bad launches...)."""
    assert _library is not None, "cuda_emu not loaded"
    return _library.cuda_emu_error_count()


def errors_since(count: int) -> list[str]:
    assert _library is not None, "cuda_emu not loaded"
    return [_library.cuda_emu_error(i).decode() for i in range(count, _library.cuda_emu_error_count())]


class _RouteToCudaKernels(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "epic_ext" and all(
            type(leaf) is torch.Tensor for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
        ):
            return func.redispatch(_CUDA_KEYS, *args, **kwargs)
        return func(*args, **kwargs)  # aten ops, and epic_ext ops on fake / functional tensors


@contextlib.contextmanager
def kernels_on_cpu():
    """Inside: torch.ops.epic_ext.* on CPU tensors run the emulated CUDA kernels."""
    assert _library is not None, "cuda_emu not loaded"
    with _RouteToCudaKernels():
        yield
