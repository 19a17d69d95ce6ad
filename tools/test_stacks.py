"""Run the suite on other torch stacks, each in its own virtual environment (`make test-tv`, `make test-torch-range`).

`make test` runs on torch 2.13.0 (CPU build, no torchvision) in .venv. This script builds other stacks, each in
build/stacks/<stack>/ (a venv), and runs tests there with that venv's python:

  tv            torch 2.14.1 + torchvision 0.29.1 (CUDA 13 builds that import and run on the CPU), the pinned
                transformers and DeepSpeed, the test tools, the eval extra (lmms-eval), decord and qwen-vl-utils
                (lmms-eval's Qwen wrappers import it): the whole suite (the CUDA cases skip without a GPU).
  torch-lowest  the lowest torch the package supports (LOWEST_TORCH below, = pyproject's torch>=) and
  torch-newest  the newest torch release (NEWEST_TORCH): the op and model tests (CI); with --full also the training
                and compression tests (make test-stacks). torch-newest is above this machine's global pip cap
                (/etc/xdg/pip: torch<=2.14.1): the stack's own constraints file, given to pip as PIP_CONSTRAINT for
                this venv's pip calls only, replaces the global one (nothing is deleted).

Every pip call of a stack goes through its own constraints file: the project's constraints.txt with the torch pin
replaced by the stack's (and torchvision pinned where the stack has it), so nothing else moves torch.
A stack's venv is built beside its final name (<stack>.partial), a completion marker written last, then moved into
place (the scripts' #! lines are rewritten to the final path); a complete venv of the same specification is reused.
The extension is then installed into it on every run (editable, `--no-build-isolation`, its own CMake build folder
build/stacks/<stack>-cmake, so rebuilds are incremental): the tv stack with the CUDA kernels too where nvcc is on
PATH and its CUDA major version is torch's, the range ends with the CPU kernels only. Tests run from the repository
root with the stack's python, as `make test` does; DeepSpeed's JIT ops go to build/stacks/<stack>-torch_extensions
(compiled against that stack's torch). A failure names the stack and pytest's counts.

Usage: python tools/test_stacks.py [--stacks tv torch-lowest torch-newest torch-X.Y.Z] [--full] [--tests PATH ...]
                                   [-- pytest args]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STACKS_DIR = ROOT / "build" / "stacks"
MARKER = ".test-stacks-complete.json"  # written last into a stack's venv: without it, the venv is built again

# The ends of the torch range the package declares (pyproject.toml: torch>=LOWEST_TORCH; README "Supported
# versions"). Why the release below LOWEST_TORCH is not supported: docs/development.md ("The torch range").
LOWEST_TORCH = "2.6.0"
NEWEST_TORCH = "2.15.0"
DEEPSPEED = "deepspeed==0.19.8"

OPS_TESTS = ["python_tests/ops"]
MODEL_TESTS = ["python_tests/models"]
TRAIN_TESTS = ["python_tests/train"]
COMPRESS_TESTS = ["python_tests/compress"]


@dataclasses.dataclass(frozen=True)
class Stack:
    key: str
    torch: str                      # exact torch release
    torchvision: str | None = None  # exact torchvision release, or none installed
    eval_extra: bool = False        # the eval extra, decord and qwen-vl-utils
    cuda: bool = False              # also build the CUDA kernels (where nvcc's CUDA major version is torch's)
    tests: tuple[str, ...] = ("python_tests",)
    full_tests: tuple[str, ...] = ()  # with --full (make test-stacks) instead of tests

    @property
    def title(self) -> str:
        return f"torch {self.torch}" + (f"+torchvision {self.torchvision}" if self.torchvision else "")


STACKS = {
    "tv": Stack("tv", "2.14.1", "0.29.1", eval_extra=True, cuda=True),
    "torch-lowest": Stack("torch-lowest", LOWEST_TORCH, tests=(*OPS_TESTS, *MODEL_TESTS),
                          full_tests=(*OPS_TESTS, *MODEL_TESTS, *TRAIN_TESTS, *COMPRESS_TESTS)),
    "torch-newest": Stack("torch-newest", NEWEST_TORCH, tests=(*OPS_TESTS, *MODEL_TESTS),
                          full_tests=(*OPS_TESTS, *MODEL_TESTS, *TRAIN_TESTS, *COMPRESS_TESTS)),
}


def constraints_text(stack: Stack) -> str:
    """constraints.txt with torch (and torchvision) pinned to the stack's releases."""
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if not re.match(r"\s*(torch|torchvision)\s*(==|<|>|~|!|$)", line)]
    lines.append(f"torch=={stack.torch}")
    if stack.torchvision:
        lines.append(f"torchvision=={stack.torchvision}")
    return "\n".join(lines) + "\n"


def eval_requirements() -> list[str]:
    """pyproject's eval extra (without installing the project), decord (lmms-eval's wrappers import it at module
    level) and qwen-vl-utils (lmms-eval's Qwen2.5-VL / Qwen3-VL wrappers import it)."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["eval"]
    return [*extra, "decord", "qwen-vl-utils"]


def requirements(stack: Stack) -> list[list[str]]:
    """The pip install argument lists that make the stack, in order (also the venv's identity for reuse)."""
    steps = [[f"torch=={stack.torch}", *([f"torchvision=={stack.torchvision}"] if stack.torchvision else [])],
             ["-r", "requirements-dev.txt"],
             ["--no-build-isolation", DEEPSPEED]]
    if stack.eval_extra:
        steps.append(eval_requirements())
    return steps


def identity(stack: Stack) -> dict:
    """What the venv is made of (its marker records it; a venv is reused only when this is unchanged)."""
    dev = (ROOT / "requirements-dev.txt").read_text() + (ROOT / "requirements-build.txt").read_text()
    return {"constraints": constraints_text(stack), "steps": requirements(stack),
            "dev": hashlib.sha256(dev.encode()).hexdigest(), "python": sys.version.split()[0]}


def pip_env(constraints: pathlib.Path) -> dict:
    # PIP_CONSTRAINT replaces the global constraints file of /etc/xdg/pip for these calls only (the stack's file
    # pins torch exactly, so nothing else can move it).
    return dict(os.environ, PIP_CONSTRAINT=str(constraints), DS_BUILD_OPS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")


def run(cmd: list[str], env: dict | None = None, what: str = "") -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # (pip's "Location ... is ignored" lines are this machine's local indexes, noise here)
        out = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                        if "is ignored: it is neither" not in line)
        raise RuntimeError(f"{what or ' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-4000:]}")


def venv_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / "bin" / "python"


def relocate_scripts(venv: pathlib.Path, old: pathlib.Path) -> None:
    """Scripts in bin/ (#! lines, activate) name the folder they were installed into: point them at venv."""
    for path in (venv / "bin").iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if str(old).encode() in data:
            path.write_bytes(data.replace(str(old).encode(), str(venv).encode()))


def ensure_venv(stack: Stack) -> pathlib.Path:
    """The stack's complete venv: reused when its marker records the same identity, else built beside its final
    name and moved into place."""
    venv = STACKS_DIR / stack.key
    want = identity(stack)
    try:
        if json.loads((venv / MARKER).read_text()) == want and venv_python(venv).exists():
            print(f"test-stacks: {stack.title}: reusing {venv.relative_to(ROOT)} (complete)", flush=True)
            return venv
    except (OSError, ValueError):
        pass
    staging = venv.with_name(venv.name + ".partial")
    for leftover in (staging, venv):
        if leftover.exists():
            shutil.rmtree(leftover)
    STACKS_DIR.mkdir(parents=True, exist_ok=True)
    constraints = STACKS_DIR / f"{stack.key}-constraints.txt"
    constraints.write_text(want["constraints"])
    start = time.perf_counter()
    print(f"test-stacks: {stack.title}: building {staging.relative_to(ROOT)}", flush=True)
    run([sys.executable, "-m", "venv", str(staging)], what="python -m venv")
    env = pip_env(constraints)
    for step in want["steps"]:
        run([str(venv_python(staging)), "-m", "pip", "install", "-q", *step], env=env,
            what=f"{stack.title}: pip install {' '.join(step)}")
    check = "import torch; print(torch.__version__)" + ("; import torchvision; print(torchvision.__version__)"
                                                       if stack.torchvision else "")
    proc = subprocess.run([str(venv_python(staging)), "-c", check], capture_output=True, text=True, cwd="/")
    seen = proc.stdout.split()
    if proc.returncode != 0 or not seen or seen[0].split("+")[0] != stack.torch:
        raise RuntimeError(f"{stack.title}: the new venv does not import the stack's torch/torchvision: "
                           f"{proc.stdout}{proc.stderr[-2000:]}")
    (staging / MARKER).write_text(json.dumps(want))
    os.rename(staging, venv)
    relocate_scripts(venv, staging)
    print(f"test-stacks: {stack.title}: venv ready ({' '.join(seen)}) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return venv


def nvcc_cuda_major() -> str | None:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    match = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return match.group(1) if match else None


def install_extension(stack: Stack, venv: pathlib.Path) -> str:
    """Editable install of the project into the stack's venv, compiled against its torch; returns build info."""
    py = str(venv_python(venv))
    torch_cuda = subprocess.run([py, "-c", "import torch; print(torch.version.cuda or '')"], capture_output=True,
                                text=True, cwd="/").stdout.strip()
    nvcc_major = nvcc_cuda_major()
    # The range ends build the CPU kernels only (what they check is the torch API, and the CUDA build costs minutes;
    # CUDA linking is the tv stack's, and make cuda-link-check's against 2.15.0).
    cuda = "ON" if stack.cuda and torch_cuda and nvcc_major and torch_cuda.split(".")[0] == nvcc_major else "OFF"
    if os.environ.get("EPIC_EXT_CUDA") == "OFF":  # asked for: CPU kernels only (the CUDA build takes minutes)
        cuda = "OFF"
    env = dict(pip_env(STACKS_DIR / f"{stack.key}-constraints.txt"), EPIC_EXT_CUDA=cuda)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    start = time.perf_counter()
    print(f"test-stacks: {stack.title}: building the extension (EPIC_EXT_CUDA={cuda}; torch CUDA {torch_cuda or '-'}, "
          f"nvcc CUDA {nvcc_major or '-'})", flush=True)
    run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", ".",
         f"--config-settings=build-dir={STACKS_DIR.relative_to(ROOT)}/{stack.key}-cmake"], env=env,
        what=f"{stack.title}: building the extension")
    info = subprocess.run([py, "-c", "import epic_ext, json; print(json.dumps(epic_ext.build_info()))"],
                          capture_output=True, text=True, cwd=ROOT)
    if info.returncode != 0:
        raise RuntimeError(f"{stack.title}: epic_ext does not import: {info.stderr[-2000:]}")
    print(f"test-stacks: {stack.title}: extension built in {time.perf_counter() - start:.0f} s: {info.stdout.strip()}",
          flush=True)
    return info.stdout.strip()


def run_tests(stack: Stack, venv: pathlib.Path, tests: list[str], pytest_args: list[str]) -> tuple[int, str]:
    """pytest with the stack's python, from the repository root; returns its exit code and its summary line."""
    # unbuffered: pytest writes into our pipe, and its progress should show as it goes
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(STACKS_DIR / f"{stack.key}-torch_extensions"),
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(venv_python(venv)), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *pytest_args]
    summary = ""
    with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if re.search(r"\d+ (passed|failed|error|errors|skipped)\b.* in [\d.]+s", line):
                summary = line.strip().strip("= ")
    return proc.returncode, summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        pytest_args = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description="Run the suite on other torch stacks, each in its own venv.")
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), help=f"stacks: {', '.join(STACKS)}, or "
                        "torch-X.Y.Z (any torch release, with the lowest stack's tests)")
    parser.add_argument("--tests", nargs="+", help="test paths instead of each stack's own")
    parser.add_argument("--full", action="store_true",
                        help="the range ends' full test sets (op, model, training, compression tests) instead of CI's "
                             "(op and model tests)")
    args = parser.parse_args(argv)
    results = []
    for key in args.stacks:
        if key in STACKS:
            stack = STACKS[key]
        elif re.fullmatch(r"torch-\d+\.\d+\.\d+", key):
            stack = dataclasses.replace(STACKS["torch-lowest"], key=key, torch=key[len("torch-"):])
        else:
            parser.error(f"unknown stack {key!r}")
        start = time.perf_counter()
        try:
            venv = ensure_venv(stack)
            install_extension(stack, venv)
        except RuntimeError as exc:
            print(f"test-stacks: {exc}", flush=True)
            results.append((stack, "SET-UP FAILED", time.perf_counter() - start, 0.0))
            continue
        setup_s = time.perf_counter() - start
        tests = args.tests or list(stack.full_tests if args.full and stack.full_tests else stack.tests)
        print(f"test-stacks: {stack.title}: pytest {' '.join(tests)}", flush=True)
        code, summary = run_tests(stack, venv, tests, pytest_args)
        outcome = f"passed ({summary})" if code == 0 else f"FAILED: {summary or f'pytest exit {code}'}"
        results.append((stack, outcome, setup_s, time.perf_counter() - start - setup_s))
    print("\ntest-stacks summary:")
    for stack, outcome, setup_s, test_s in results:
        print(f"  stack {stack.title} ({stack.key}): {outcome}; set-up {setup_s:.0f} s, tests {test_s:.0f} s")
    failed = [f"stack {stack.title}: {outcome.removeprefix('FAILED: ')}" for stack, outcome, _, _ in results
              if not outcome.startswith("passed")]
    if failed:
        print("test-stacks: FAILED on " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
