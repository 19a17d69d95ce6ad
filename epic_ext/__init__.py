"""epic_ext: fast, trainable visual-token compression for multimodal LLMs.

The compiled kernels live in ``epic_ext._C`` (built by ``pip install --no-build-isolation .``) and are reached
through :mod:`epic_ext.ops`. Importing the package works without them, so that the pure-torch references and
the Python tools stay usable; calling an op then raises an error that says how to build the extension.
"""

from __future__ import annotations

import importlib
import logging

import torch  # loads libtorch before the extension that links against it

__version__ = "0.1.0"

_logger = logging.getLogger(__name__)

_C = None
_EXTENSION_ERROR: str | None = None
try:
    # import_module, not `from . import _C`: the latter would return the `_C = None` attribute set above.
    _C = importlib.import_module("._C", __name__)  # registers torch.ops.epic_ext.*
except ImportError as exc:  # not built, or built against another torch (undefined symbols)
    _EXTENSION_ERROR = (
        f"the compiled extension epic_ext._C could not be loaded ({exc}). Build it against the torch you run "
        f"(torch {torch.__version__}): `pip install --no-build-isolation .` in the epic_ext source tree "
        "(or `make build`)."
    )
    _logger.warning("epic_ext: %s", _EXTENSION_ERROR)
else:
    if _C.torch_version() != torch.__version__:
        _EXTENSION_ERROR = (
            f"epic_ext._C was compiled against torch {_C.torch_version()} but torch {torch.__version__} is "
            "imported; rebuild with `pip install --no-build-isolation .`"
        )
        _logger.warning("epic_ext: %s", _EXTENSION_ERROR)


def extension_available() -> bool:
    """True when the compiled kernels are loaded and match the imported torch."""
    return _EXTENSION_ERROR is None


def build_info() -> dict:
    """What was compiled: package version, torch it was built against, CUDA kernels and architectures."""
    if _C is None:
        return {"extension": False, "error": _EXTENSION_ERROR}
    return {
        "extension": _EXTENSION_ERROR is None,
        "version": _C.version(),
        "torch": _C.torch_version(),
        "cuda_built": _C.cuda_built(),
        "cuda_archs": _C.archs(),
        "error": _EXTENSION_ERROR,
    }


from . import ops, reference  # noqa: E402  (after the extension is loaded: ops registers fakes for its ops)

__all__ = ["ops", "reference", "build_info", "extension_available", "__version__"]
