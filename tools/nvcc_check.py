"""Compile every csrc/cuda/*.cu with `nvcc -c` against the installed torch's headers.

Used by `make cuda-check` and by python_tests/tools/test_cuda_sources_compile.py, so that CUDA code that does not
compile fails CI even on machines with no GPU and a CPU-only torch (which still ships the CUDA headers of ATen
and c10). Objects go to a temporary directory and are thrown away; nothing is linked.

It also builds and runs the host self-checks tools/check_*.cu (the pure index/softmax logic of the kernels,
factored into __host__ __device__ headers, exercised on the CPU against double-precision or naive versions).

Usage: python tools/nvcc_check.py [--arch sm_90] [--jobs 2] [--no-host-checks] [files...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def nvcc_command(source: pathlib.Path, output: pathlib.Path, arch: str, torch_dir: pathlib.Path) -> list[str]:
    return [
        shutil.which("nvcc") or "nvcc",
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        f"-arch={arch}",
        "-DEPIC_EXT_WITH_CUDA",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
        f"-I{ROOT / 'csrc'}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        "-Xcompiler",
        "-fPIC",
        "-Werror",
        "all-warnings",
        "-c",
        str(source),
        "-o",
        str(output),
    ]


def compile_all(files: list[pathlib.Path], arch: str, jobs: int) -> list[tuple[pathlib.Path, int, float, str]]:
    import torch  # noqa: PLC0415  (only to find its headers)

    torch_dir = pathlib.Path(torch.__file__).parent
    results = []
    with tempfile.TemporaryDirectory() as tmp:

        def one(source: pathlib.Path):
            start = time.perf_counter()
            proc = subprocess.run(
                nvcc_command(source, pathlib.Path(tmp) / (source.stem + ".o"), arch, torch_dir),
                capture_output=True,
                text=True,
            )
            return source, proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(one, files):
                results.append(result)
                source, rc, seconds, _ = result
                status = "ok" if rc == 0 else f"FAILED (exit {rc})"
                print(f"nvcc -c {source.relative_to(ROOT)} [{arch}]: {status} in {seconds:.0f} s", flush=True)
    return results


def run_host_checks() -> list[tuple[pathlib.Path, int, str]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted((ROOT / "tools").glob("check_*.cu")):
            binary = pathlib.Path(tmp) / source.stem
            build = subprocess.run([shutil.which("nvcc") or "nvcc", "-std=c++20", "-O2", f"-I{ROOT / 'csrc' / 'cuda'}",
                                    f"-I{ROOT / 'csrc'}", "-x", "cu", str(source), "-o", str(binary)],
                                   capture_output=True, text=True)
            if build.returncode != 0:
                results.append((source, build.returncode, build.stdout + build.stderr))
                print(f"host check {source.name}: BUILD FAILED", flush=True)
                continue
            run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
            results.append((source, run.returncode, run.stdout + run.stderr))
            tail = (run.stdout.strip().splitlines() or [""])[-1]
            print(f"host check {source.name}: {'ok' if run.returncode == 0 else 'FAILED'} ({tail})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=pathlib.Path)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-host-checks", action="store_true", help="skip building/running tools/check_*.cu")
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("nvcc not found: CUDA sources not compiled", file=sys.stderr)
        return 2
    files = args.files or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:
        print("no CUDA sources found", file=sys.stderr)
        return 1
    results = compile_all([f.resolve() for f in files], args.arch, args.jobs)
    failed = [(r[0], r[3]) for r in results if r[1] != 0]
    if not args.no_host_checks and not args.files:
        failed += [(source, output) for source, rc, output in run_host_checks() if rc != 0]
    for source, output in failed:
        print(f"---- {source.relative_to(ROOT)} ----\n{output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
