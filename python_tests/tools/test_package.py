"""Package-level behaviour: build information, and a clear error when the compiled extension is missing."""

from __future__ import annotations

import subprocess
import sys

import torch

import epic_ext


def test_build_info_matches_the_running_torch():
    info = epic_ext.build_info()
    assert info["extension"] is True and info["error"] is None
    assert info["version"] == epic_ext.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_built"], bool)
    assert (info["cuda_archs"] != "") == info["cuda_built"]  # archs listed exactly when CUDA kernels were built


def test_missing_extension_imports_and_ops_say_how_to_build(tmp_path):
    code = (
        "import sys; sys.modules['epic_ext._C'] = None\n"  # makes `import epic_ext._C` fail like a missing build
        "import torch, epic_ext\n"
        "from epic_ext import ops, reference\n"
        "assert not epic_ext.extension_available()\n"
        "print(reference.temperature_kl(torch.randn(2, 5), torch.randn(2, 5)).item() >= 0)\n"
        "try:\n"
        "    ops.temperature_kl(torch.randn(2, 5), torch.randn(2, 5))\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "True" in proc.stdout  # the pure-torch references still work
    assert "ERROR epic_ext: the compiled extension epic_ext._C could not be loaded" in proc.stdout
    assert "pip install --no-build-isolation" in proc.stdout
    assert "could not be loaded" in proc.stderr  # and the import logged why

