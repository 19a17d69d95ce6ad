"""The package's layering and the test suite's independence, read from the sources (every import statement, those
inside functions included): no module of epic_ext imports a part above it, and no test imports another test."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "epic_ext"

# Parts from the bottom up; a module may import its own part and the parts below it.
LAYERS = [
    {"epic_ext", "epic_ext._C", "epic_ext.ops", "epic_ext.reference"},
    {"epic_ext.compress", "epic_ext.schedules"},
    {"epic_ext.data"},
    {"epic_ext.models"},
    {"epic_ext.cost", "epic_ext.distill", "epic_ext.cli"},
    {"epic_ext.train", "epic_ext.eval", "epic_ext.lmms_eval_plugin", "epic_ext.efficiency"},
    {"epic_ext.demo"},
]
# Same-layer imports that are refused: evaluation never pulls in the trainer.
FORBIDDEN = {("epic_ext.eval", "epic_ext.train"), ("epic_ext.lmms_eval_plugin", "epic_ext.train"),
             ("epic_ext.efficiency", "epic_ext.train")}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of every epic_ext module the file imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import ops` imports a module
    return {m for m in found if m == "epic_ext" or m.startswith("epic_ext.")}


def _part(module: str) -> str | None:
    """The part (layer entry) a module belongs to: the longest LAYERS name that is it or contains it."""
    names = [n for layer in LAYERS for n in layer if module == n or module.startswith(n + ".")]
    return max(names, key=len) if names else None


def _rank(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_has_a_part():
    unplaced = [_module_name(p) for p in PACKAGE.rglob("*.py") if _part(_module_name(p)) is None]
    assert unplaced == [], f"modules outside LAYERS (add them to a part): {unplaced}"


def test_no_module_imports_a_part_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(_module_name(path))
        for imported in sorted(_imports(path)):
            target = _part(imported)
            if target is None or target == own:
                continue
            if _rank(target) > _rank(own) or (own, target) in FORBIDDEN:
                upward.append(f"{path.relative_to(ROOT)} imports {imported} ({own} -> {target})")
    assert upward == [], "\n".join(upward)


def test_data_reads_no_model_family():
    """The data readers are handed what depends on the checkpoint; they never work out its family themselves."""
    readers = [p for p in (PACKAGE / "data").glob("*.py") if "model_type" in p.read_text()]
    assert readers == []


def test_no_test_imports_another_test():
    offenders = []
    for path in sorted((ROOT / "python_tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[-1].startswith("test_") or n.split(".")[0] == "conftest"]
    assert offenders == [], offenders


def test_tests_are_grouped_by_part():
    loose = sorted(p.name for p in (ROOT / "python_tests").glob("*.py") if p.name != "conftest.py")
    assert loose == [], f"test modules or helpers outside the part folders and helpers/: {loose}"
