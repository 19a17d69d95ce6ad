"""Run the transformers-dependent tests against other transformers releases (`make test-compat`).

`make test` runs against the release pinned in constraints.txt. This script checks the two ends of the supported
range: the lowest supported release (epic_ext.models._hf.MIN_VERSION) and the newest release that installs from the
package index today (whatever `pip install transformers` resolves to, even beyond the declared range: that is how a
new release's breakage shows up before users see it).

Each release is installed with its own dependencies into build/compat/transformers-<version>/ (pip --target) and
put in front of the project's virtual environment with PYTHONPATH, so torch, the compiled extension and DeepSpeed
are shared and nothing is rebuilt. numpy stays at the environment's version. A failure names the release.
An environment is installed beside its final name and moved there with a completion marker written last, so an
interrupted run leaves nothing half-installed under that name; a complete one of an exact release is reused.

Usage: python tools/test_compat.py [--versions 5.17.0 newest] [--tests FILE ...] [-- pytest args]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPAT_DIR = ROOT / "build" / "compat"
# Everything that imports transformers: the model patch, efficiency, the distillation loss, training, evaluation.
DEFAULT_TESTS = ["python_tests/models/test_models_llava.py", "python_tests/models/test_models_llava_next.py",
                 "python_tests/models/test_models_llava_onevision.py", "python_tests/models/test_models_qwen_vl.py",
                 "python_tests/eval/test_cost.py",
                 "python_tests/train/test_distill.py", "python_tests/data/test_data_llava.py",
                 "python_tests/train/test_train_config.py", "python_tests/train/test_train_loop.py",
                 "python_tests/data/test_data_chat.py", "python_tests/train/test_train_loop_chat.py",
                 "python_tests/data/test_data_onevision.py", "python_tests/train/test_train_loop_onevision.py",
                 "python_tests/eval/test_eval_cli.py"]


def lowest_version() -> str:
    """MIN_VERSION of epic_ext/models/_hf.py (read as text: importing the package would import transformers)."""
    match = re.search(r'^MIN_VERSION = "([^"]+)"', (ROOT / "epic_ext" / "models" / "_hf.py").read_text(), re.M)
    if match is None:
        raise RuntimeError("epic_ext/models/_hf.py defines no MIN_VERSION")
    return match.group(1)


def pinned_version() -> str | None:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("transformers=="):
            return line.split("==", 1)[1]
    return None


MARKER = ".test-compat-complete.json"  # written last into an environment: without it, it is rebuilt


def reusable(target: pathlib.Path, spec: str, constraints: str) -> str | None:
    """The transformers version of the environment at target, when it is complete (its marker, written last,
    is there) and was installed for the same spec and constraints; None otherwise."""
    try:
        record = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if record.get("spec") != spec or record.get("constraints") != constraints:
        return None
    if not (target / f"transformers-{record.get('version')}.dist-info").is_dir():
        return None
    return record["version"]


def install(spec: str, target: pathlib.Path, reuse: bool = True) -> str:
    """pip install --target into a staging folder beside target, a completion marker written last, then moved
    into place: an interrupted install leaves no environment under target's name (a leftover staging folder, or
    an environment without the marker, is removed and installed again). A complete environment of the same spec
    and constraints is reused when `reuse`. Returns the installed transformers version."""
    constraints = target.parent / "compat-constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    # the project's constraints minus its transformers pin, plus numpy at the environment's version (a second
    # numpy in front of the one torch was loaded with would be asking for trouble)
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if not line.strip().startswith("transformers")]
    lines.append(f"numpy=={importlib.metadata.version('numpy')}")
    constraint_text = "\n".join(lines) + "\n"
    if reuse and (version := reusable(target, spec, constraint_text)):
        print(f"test-compat: reusing {target} (transformers {version}, complete)", flush=True)
        return version
    constraints.write_text(constraint_text)
    staging = target.with_name(target.name + ".partial")
    for leftover in (staging, target):
        if leftover.exists():
            shutil.rmtree(leftover)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(staging),
           "-c", str(constraints), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not install {spec}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    found = sorted(staging.glob("transformers-*.dist-info"))
    if not found:
        raise RuntimeError(f"pip installed no transformers into {staging}")
    version = found[0].name[len("transformers-"): -len(".dist-info")]
    (staging / MARKER).write_text(json.dumps({"spec": spec, "constraints": constraint_text, "version": version}))
    os.rename(staging, target)
    return version


def run_tests(target: pathlib.Path, version: str, tests: list[str], pytest_args: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    check = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    seen = check.stdout.strip()
    if seen != version:
        print(f"test-compat: expected transformers {version} in front of the environment, python sees {seen!r}"
              f"{check.stderr[-1000:]}", flush=True)
        return 1
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *pytest_args]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        pytest_args = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description="Run the transformers-dependent tests against other releases.")
    parser.add_argument("--versions", nargs="+", default=["lowest", "newest"],
                        help="releases to test: 'lowest' (the lowest supported), 'newest' (the newest that "
                             "installs), or exact versions")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files to run")
    parser.add_argument("--skip-pinned", action="store_true",
                        help="do not run the tests again for a release equal to constraints.txt's pin (CI: make "
                             "test has just run them against it)")
    args = parser.parse_args(argv)
    results = []
    for wanted in args.versions:
        spec = {"lowest": f"transformers=={lowest_version()}", "newest": "transformers"}.get(
            wanted, f"transformers=={wanted}")
        target = COMPAT_DIR / f"transformers-{wanted}"
        start = time.perf_counter()
        print(f"test-compat: installing {spec} ({wanted}) into {target.relative_to(ROOT)}", flush=True)
        try:
            version = install(spec, target, reuse=wanted != "newest")  # "newest" changes: asked again each time
        except RuntimeError as exc:
            print(f"test-compat: {wanted}: {exc}", flush=True)
            results.append((wanted, "?", "INSTALL FAILED", time.perf_counter() - start))
            continue
        note = " (the release make test pins)" if version == pinned_version() else ""
        if note and args.skip_pinned:
            print(f"test-compat: transformers {version}{note}: covered by make test, not run again", flush=True)
            results.append((wanted, version, "passed (in make test)", time.perf_counter() - start))
            continue
        print(f"test-compat: transformers {version}{note}: running {len(args.tests)} test files", flush=True)
        code = run_tests(target, version, args.tests, pytest_args)
        results.append((wanted, version, "passed" if code == 0 else f"FAILED (pytest exit {code})",
                        time.perf_counter() - start))
    print("\ntest-compat summary:")
    for wanted, version, outcome, seconds in results:
        print(f"  transformers {version:<8} ({wanted}): {outcome}, {seconds:.0f} s")
    failed = [f"transformers {version} ({wanted})" for wanted, version, outcome, _ in results
              if not outcome.startswith("passed")]
    if failed:
        print(f"test-compat: FAILED on {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
