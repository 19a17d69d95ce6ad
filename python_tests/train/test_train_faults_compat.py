"""`make test-compat`'s environments (tools/test_compat.py) are complete or rebuilt: an install interrupted at
any moment leaves nothing under the environment's name, the same command installs it again, and a complete one
(its marker written last) is reused instead of reinstalled. pip is replaced by a fake that writes a few files."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def compat(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("test_compat_tool", ROOT / "tools" / "test_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_pip(cmd, **kwargs):
        """pip install --target DIR: writes a package and its dist-info; with `interrupt`, stops halfway."""
        target = pathlib.Path(cmd[cmd.index("--target") + 1])
        calls.append(target)
        (target / "transformers").mkdir(parents=True)
        (target / "transformers" / "__init__.py").write_text("__version__ = '5.17.0'\n")
        if module.interrupt:
            raise KeyboardInterrupt
        (target / "transformers-5.17.0.dist-info").mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    module.interrupt = False
    monkeypatch.setattr(module.subprocess, "run", fake_pip)
    return module, calls, tmp_path / "compat" / "transformers-lowest"


def test_an_interrupted_install_leaves_nothing_under_its_name_and_is_redone(compat):
    module, calls, target = compat
    module.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        module.install("transformers==5.17.0", target)
    assert not target.exists()  # only a staging folder beside it
    module.interrupt = False
    assert module.install("transformers==5.17.0", target) == "5.17.0"
    record = json.loads((target / module.MARKER).read_text())
    assert record["spec"] == "transformers==5.17.0" and record["version"] == "5.17.0"
    assert sorted(p.name for p in target.parent.iterdir()) == ["compat-constraints.txt", "transformers-lowest"]


def test_a_complete_environment_is_reused_and_an_unmarked_one_rebuilt(compat, capsys):
    module, calls, target = compat
    module.install("transformers==5.17.0", target)
    assert module.install("transformers==5.17.0", target) == "5.17.0"
    assert len(calls) == 1 and "reusing" in capsys.readouterr().out
    assert module.install("transformers==5.17.0", target, reuse=False) == "5.17.0" and len(calls) == 2
    (target / module.MARKER).unlink()  # as an install interrupted before the marker would leave it
    module.install("transformers==5.17.0", target)
    assert len(calls) == 3 and (target / module.MARKER).is_file()
    module.install("transformers==5.24.0", target)  # another release under the same name: installed again
    assert len(calls) == 4
