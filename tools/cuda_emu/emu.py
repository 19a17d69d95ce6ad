"""cuda_emu driver: builds csrc/cuda for the CPU against tools/cuda_emu and runs the op tests' CUDA cases on it.

The .cu files are compiled unmodified by g++ as host C++ after two mechanical rewrites (with `#line` directives, so
that every report names the original file and line): `k<<<cfg>>>(args)` becomes a call of the runtime's launcher,
and `extern __shared__ T name[];` a pointer to the block's dynamic shared memory. c10/cuda's guard, stream and
error-check headers are replaced by small stubs (tools/cuda_emu/include/c10/cuda); the CUDA headers come from the
toolkit of the nvcc on PATH or, without one, from the nvidia-cuda-runtime / -crt / -cccl wheels.

Usage:
  python tools/cuda_emu/emu.py build [--variant release|asan|perf]    -> build/cuda_emu/<variant>/libepic_ext_cuda_emu.so
  python tools/cuda_emu/emu.py selftest [--variant ...]          the runtime's own tests (no torch)
  python tools/cuda_emu/emu.py test [--variant ...] [--config NAME ...] [-- pytest args]
  python tools/cuda_emu/emu.py ci                                 what `make cuda-emu` runs: both builds, the
                                                                  self-test and every configuration
Configurations (device shape the host code sees, and the order in which threads and blocks run) are CONFIGS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMU_DIR = ROOT / "tools" / "cuda_emu"
BUILD_DIR = ROOT / "build" / "cuda_emu"
LIBRARY_NAME = "libepic_ext_cuda_emu.so"

VARIANT_FLAGS = {
    "release": ["-O2"],
    # alignment: UBSan's check of every typed access, so a misaligned float4 dereference fails too (x86 forgives
    # it; a GPU does not).
    "asan": ["-O1", "-g", "-fsanitize=address,alignment", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    # Memory-traffic counters (tools/cuda_emu/PERF.md): ThreadSanitizer's instrumentation reports every load and
    # store to the runtime's callbacks. Nothing may merge, widen or split the kernels' accesses on the way: no
    # auto-vectorisation, no store merging, and no scalar replacement of aggregates (which would turn one float4
    # access, one 16-byte instruction on a GPU, into four strided 4-byte ones). -g names each instruction's line.
    "perf": ["-O2", "-g", "-DCUDA_EMU_PERF", "-fno-tree-vectorize", "-fno-tree-slp-vectorize", "-fno-store-merging",
             "-fno-tree-sra", "-fno-ipa-sra"],
}
# Only the kernels' units are instrumented; the runtime that counts is not.
INSTRUMENT_FLAGS = {"perf": ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
                             "--param", "tsan-distinguish-volatile=0"]}
COMMON_FLAGS = [
    "-std=c++20",
    "-march=native",  # built where it runs (build/ is never shared); fmaf & co. inline instead of calling libm
    "-fPIC",
    "-fno-strict-aliasing",  # nvcc code reinterprets loaded vectors freely
    "-ffp-contract=off",  # deterministic float results across builds; the GPU's FMA contraction is not modelled
    "-Wall",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-Wno-unused-function",
    "-Wno-unused-variable",
]

MIB = 1 << 20
KIB = 1 << 10
# name -> environment. Shapes: an H100 (132 SMs, 50 MiB L2, 227 KiB opt-in), one SM of a small part with no
# opt-in beyond 48 KiB, an A100-like 8-SM slice, and a 4-SM sm_86-like part for the AddressSanitizer run.
CONFIGS = {
    "132sm-forward": dict(CUDA_EMU_SMS=132, CUDA_EMU_L2_BYTES=50 * MIB, CUDA_EMU_SMEM_OPTIN=227 * KIB,
                          CUDA_EMU_ORDER="forward"),
    "1sm-reverse": dict(CUDA_EMU_SMS=1, CUDA_EMU_L2_BYTES=2 * MIB, CUDA_EMU_SMEM_OPTIN=48 * KIB,
                        CUDA_EMU_ORDER="reverse"),
    "8sm-random": dict(CUDA_EMU_SMS=8, CUDA_EMU_L2_BYTES=6 * MIB, CUDA_EMU_SMEM_OPTIN=163 * KIB,
                       CUDA_EMU_ORDER="random", CUDA_EMU_SEED=20261203),
    "4sm-random-asan": dict(CUDA_EMU_SMS=4, CUDA_EMU_L2_BYTES=4 * MIB, CUDA_EMU_SMEM_OPTIN=99 * KIB,
                            CUDA_EMU_ORDER="random", CUDA_EMU_SEED=7),
}
# The two largest parameter grids (24 attention shapes, 18 dtype pairs) add little to a second and third look: the
# random-order and ASan runs keep a third of them, every other case whole.
SMALLER_GRIDS = ("not (test_matches_reference_fp32 and not Hq14) and "
                 "not (test_low_precision_error_at_most_twice_plain_torch and not 1271)")
CI_RUNS = [("release", "132sm-forward", None), ("release", "1sm-reverse", None),
           ("release", "8sm-random", SMALLER_GRIDS), ("asan", "4sm-random-asan", SMALLER_GRIDS)]
OP_TESTS = ["python_tests/ops/test_ops_temperature_kl.py", "python_tests/ops/test_ops_attention_importance.py",
            "python_tests/ops/test_ops_select_tokens.py", "python_tests/ops/test_ops_gather_tokens.py",
            "python_tests/ops/test_ops_alignment.py", "python_tests/ops/test_ops_shared_memory_limits.py",
            "python_tests/tools/test_cuda_emu.py"]


class BuildError(RuntimeError):
    pass


# ---- CUDA headers ------------------------------------------------------------------------------------------------
def cuda_include_dirs() -> list[pathlib.Path]:
    """Directories holding cuda_runtime.h, cuda_bf16.h, cuda_fp16.h (and CCCL)."""
    if os.environ.get("CUDA_EMU_CUDA_INCLUDE"):
        return [pathlib.Path(p) for p in os.environ["CUDA_EMU_CUDA_INCLUDE"].split(os.pathsep)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script: ask it where its headers are.
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True)
        for line in (proc.stdout + proc.stderr).splitlines():
            m = re.search(r'INCLUDES="([^"]*)"', line)
            if m:
                dirs = [pathlib.Path(p[2:]) for p in m.group(1).split() if p.startswith("-I")]
                dirs = [d.resolve() for d in dirs if (d / "cuda_runtime.h").exists()]
                if dirs:
                    return dirs
    # The wheels' layout: nvidia/cu13/include/{cuda_runtime.h, crt/...}, CCCL in nvidia/cu13/include/cccl.
    site = pathlib.Path(os.environ.get("CUDA_EMU_WHEELS_SITE", sysconfig.get_paths()["purelib"])) / "nvidia"
    runtime = sorted(site.glob("**/include/cuda_runtime.h"))
    if runtime and (runtime[0].parent / "crt" / "host_defines.h").exists():
        dirs = [runtime[0].parent]
        dirs += [v.parents[2] for v in sorted(site.glob("**/cuda/std/version"))[:1]]
        return dirs
    raise BuildError("cuda_emu: no CUDA headers: put nvcc on PATH, set CUDA_EMU_CUDA_INCLUDE, or "
                     "`pip install -c constraints.txt nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl`")


def torch_dirs() -> tuple[pathlib.Path, str]:
    import torch  # noqa: PLC0415

    return pathlib.Path(torch.__file__).parent, torch.__version__


# ---- the source rewrite -------------------------------------------------------------------------------------------
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
KERNEL_BEFORE = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*$")
STATIC_SHARED = re.compile(r"(?<!extern )(?P<decl>__shared__\s+[^;{}()]+?\s+(?P<name>\w+)\s*(?:\[[^\]]*\]\s*)*;)")


def rewrite(text: str, display_path: str) -> str:
    """The three mechanical rewrites; the line structure is kept, so `#line 1` maps every line back. Besides launches
    and `extern __shared__`, each static `__shared__` declaration is followed (on its line) by a call that sizes and
    poisons it per block."""
    text = STATIC_SHARED.sub(lambda m: f"{m['decl']} ::cuda_emu::detail::static_shared(&{m['name']}, "
                             f"sizeof({m['name']}), \"{m['name']}\", ::cuda_emu::Site::current());", text)
    text = EXTERN_SHARED.sub(lambda m: f"{m['type']}* const {m['name']} = ::cuda_emu::dynamic_shared<{m['type']}>();",
                             text)
    out = []
    pos = 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            break
        line_start = text.rfind("\n", 0, start) + 1
        if "//" in text[line_start:start]:  # inside a comment
            out.append(text[pos:start + 3])
            pos = start + 3
            continue
        end = text.find(">>>", start)
        if end < 0:
            raise BuildError(f"{display_path}:{text.count(chr(10), 0, start) + 1}: '<<<' without '>>>'")
        m = KERNEL_BEFORE.search(text, pos, start)
        name = m.group(1) if m else "kernel"
        out.append(text[pos:start])
        out.append(f' * ::cuda_emu::launch_config("{name}", __FILE__, __LINE__, {text[start + 3:end]})')
        pos = end + 3
    out.append(text[pos:])
    return f'#line 1 "{display_path}"\n' + "".join(out)


def rewrite_tree(src: pathlib.Path, dst: pathlib.Path, display_dir: str) -> list[pathlib.Path]:
    """Rewrites every .cu / .cuh of src into dst, their reports naming display_dir/<file>; returns the .cu units.
    (A copy of csrc/cuda, e.g. with a planted bug, keeps the names, and so shares the objects of unchanged files.)"""
    dst.mkdir(parents=True, exist_ok=True)
    units = []
    for path in sorted(list(src.glob("*.cu")) + list(src.glob("*.cuh"))):
        new = rewrite(path.read_text(), f"{display_dir}/{path.name}")
        target = dst / path.name
        if not target.exists() or target.read_text() != new:
            target.write_text(new)
        if path.suffix == ".cu":
            units.append(target)
    return units


# ---- compiling -----------------------------------------------------------------------------------------------------
def compile_flags(variant: str, with_torch: bool, instrumented: bool = True) -> list[str]:
    """The same for every copy of the sources: a unit finds its .cuh files beside it ("..." includes)."""
    flags = COMMON_FLAGS + VARIANT_FLAGS[variant] + (INSTRUMENT_FLAGS.get(variant, []) if instrumented else [])
    flags += ["-include", str(EMU_DIR / "include" / "cuda_emu" / "cuda_emu.h")]
    flags += [f"-I{EMU_DIR / 'include'}"]
    flags += [f"-I{d}" for d in cuda_include_dirs()]
    if with_torch:
        torch_dir, _ = torch_dirs()
        flags += [f"-I{ROOT / 'csrc'}", f"-I{torch_dir / 'include'}",
                  f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                  "-DEPIC_EXT_WITH_CUDA", "-DEPIC_EXT_CUDA_EMU"]
    return flags


def compile_objects(units: list[pathlib.Path], flags: list[str], obj_dir: pathlib.Path, jobs: int,
                    fingerprint: str) -> list[pathlib.Path]:
    """Compiles each unit unless an object of the same sources and flags exists (content hash, so that planted-bug
    builds in other folders reuse the objects of the files they did not change)."""
    obj_dir.mkdir(parents=True, exist_ok=True)
    headers = "".join(p.read_text() for p in sorted((EMU_DIR / "include").rglob("*.h")))

    def one(unit: pathlib.Path) -> pathlib.Path:
        local = "".join(p.read_text() for p in sorted(unit.parent.glob("*.cuh")))
        key = hashlib.sha256("\0".join([unit.read_text(), local, headers, " ".join(flags), fingerprint,
                                        unit.name]).encode()).hexdigest()[:20]
        obj = obj_dir / f"{unit.stem}-{key}.o"
        if obj.exists():
            return obj
        start = time.perf_counter()
        cmd = ["g++", *flags, "-x", "c++", "-c", str(unit), "-o", str(obj) + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cuda_emu: compiling {unit.name} failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        os.replace(str(obj) + ".tmp", obj)
        print(f"cuda_emu: compiled {unit.name} in {time.perf_counter() - start:.0f} s", flush=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, units))


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 2))


def build_library(variant: str = "release", src: pathlib.Path | None = None, out: pathlib.Path | None = None,
                  jobs: int | None = None) -> pathlib.Path:
    """Builds the emulated CUDA kernels of src (default csrc/cuda) and the runtime into one shared library."""
    src = src or ROOT / "csrc" / "cuda"
    out = out or BUILD_DIR / variant
    torch_dir, torch_version = torch_dirs()
    units = rewrite_tree(src, out / "src", "csrc/cuda")
    flags = compile_flags(variant, with_torch=True)
    objects = compile_objects(units, flags, BUILD_DIR / variant / "obj", jobs or default_jobs(),
                              fingerprint=f"torch {torch_version}")
    objects += compile_objects([EMU_DIR / "runtime.cpp"], compile_flags(variant, True, instrumented=False),
                               BUILD_DIR / variant / "obj", 1, fingerprint=f"torch {torch_version}")
    library = out / LIBRARY_NAME
    cmd = ["g++", "-shared", *VARIANT_FLAGS[variant], "-o", str(library) + ".tmp", *map(str, objects),
           f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cuda_emu: linking failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(str(library) + ".tmp", library)
    return library


def build_selftest(variant: str = "release") -> pathlib.Path:
    out = BUILD_DIR / variant / "selftest"
    units = rewrite_tree(EMU_DIR / "tests", out / "src", "tools/cuda_emu/tests")
    flags = compile_flags(variant, with_torch=False)
    objects = compile_objects(units, flags, BUILD_DIR / variant / "obj-selftest", default_jobs(),
                              fingerprint="selftest")
    objects += compile_objects([EMU_DIR / "runtime.cpp"], compile_flags(variant, False, instrumented=False),
                               BUILD_DIR / variant / "obj-selftest", 1, fingerprint="selftest")
    binary = out / "cuda_emu_selftest"
    cmd = ["g++", *VARIANT_FLAGS[variant], "-o", str(binary), *map(str, objects), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cuda_emu: linking the self-test failed:\n{proc.stdout}{proc.stderr}")
    return binary


# ---- running ---------------------------------------------------------------------------------------------------
def asan_environment() -> dict[str, str]:
    """Python is not instrumented: the ASan runtime must be loaded first, and Python's own allocations are not ours
    to report as leaks."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    # libstdc++ preloaded too: python does not link it, and ASan resolves the real __cxa_throw when it starts; without
    # it, the first C++ exception (a TORCH_CHECK in a CUDA op's host code) aborts in ASan's interceptor.
    libstdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True).stdout.strip()
    return {"LD_PRELOAD": f"{libasan} {libstdcxx}", "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


def run_environment(library: pathlib.Path, config: str, variant: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in CONFIGS[config].items()})
    env["EPIC_EXT_CUDA_EMU"] = str(library)
    if variant == "asan":
        env.update(asan_environment())
    return env


def run_pytest(library: pathlib.Path, config: str, variant: str, pytest_args: list[str],
               tests: list[str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", *(tests or OP_TESTS), "-m", "cuda_emu", "-q", "-p", "no:cacheprovider",
           *pytest_args]
    return subprocess.run(cmd, cwd=ROOT, env=run_environment(library, config, variant), text=True,
                          capture_output=capture)


def run_selftest(variant: str) -> int:
    binary = build_selftest(variant)
    env = dict(os.environ)
    if variant == "asan":
        env.update(asan_environment())
        env.pop("LD_PRELOAD")  # the self-test is instrumented itself
    failed = 0
    for order in ("forward", "reverse", "random"):
        proc = subprocess.run([str(binary)], env={**env, "CUDA_EMU_ORDER": order}, text=True, capture_output=True)
        tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"cuda_emu self-test [{variant}, {order}]: {tail}", flush=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, flush=True)
            failed += 1
    return failed


def ci() -> int:
    start = time.perf_counter()
    for variant in ("release", "asan"):
        build_library(variant)
        print(f"cuda_emu: {variant} build ready ({time.perf_counter() - start:.0f} s)", flush=True)
    failures = []
    for variant in ("release", "asan"):
        if run_selftest(variant):
            failures.append(f"self-test [{variant}]")
    for variant, config, select in CI_RUNS:
        t0 = time.perf_counter()
        print(f"cuda_emu: op tests, CUDA cases, {config} [{variant}]", flush=True)
        proc = run_pytest(BUILD_DIR / variant / LIBRARY_NAME, config, variant, ["-k", select] if select else [])
        print(f"cuda_emu: {config} [{variant}]: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            failures.append(f"{config} [{variant}]")
    print(f"cuda_emu: done in {time.perf_counter() - start:.0f} s" +
          (f"; FAILED: {', '.join(failures)}" if failures else ""), flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "selftest", "test"):
        p = sub.add_parser(name)
        p.add_argument("--variant", choices=sorted(VARIANT_FLAGS), default="release")
        if name == "test":
            p.add_argument("--config", action="append", choices=sorted(CONFIGS))
            p.add_argument("pytest_args", nargs="*")
    sub.add_parser("ci")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build_library(args.variant))
            return 0
        if args.command == "selftest":
            return 1 if run_selftest(args.variant) else 0
        if args.command == "test":
            library = build_library(args.variant)
            configs = args.config or [c for v, c, _ in CI_RUNS if v == args.variant]
            rc = 0
            for config in configs:
                rc |= run_pytest(library, config, args.variant, args.pytest_args).returncode
            return rc
        return ci()
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
