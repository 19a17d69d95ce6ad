"""Proof that the emulated op tests catch real kernel bugs: each bug below is planted in a copy of csrc/cuda, the copy
is built against the emulator, and the op tests' CUDA cases must fail under at least one configuration (device shape
+ thread order). Run by `make cuda-emu-planted` (python tools/cuda_emu/planted.py [--only NAME ...]).

A bug that the tests do not catch fails this script: either the emulator or the tests lost their teeth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import pathlib
import re
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import emu  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    file: str  # under csrc/cuda
    old: str  # must occur exactly once
    new: str
    tests: str  # the op's test file
    select: str  # pytest -k expression: the cases that are enough to see it

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


KL_TESTS = "python_tests/ops/test_ops_temperature_kl.py"
ATTN_TESTS = "python_tests/ops/test_ops_attention_importance.py"
SELECT_TESTS = "python_tests/ops/test_ops_select_tokens.py"
GATHER_TESTS = "python_tests/ops/test_ops_gather_tokens.py"

BUGS = [
    Bug("removed __syncthreads (block merge reads other warps' states too early)", "temperature_kl.cu",
        "    if (lane == 0) warp_states[warp] = st;\n    __syncthreads();\n",
        "    if (lane == 0) warp_states[warp] = st;\n",
        KL_TESTS, "test_matches_fp64_reference or test_reductions_and_row_counts"),
    Bug("wrong shuffle offset (warp merge starts at 8: half-warps never meet)", "temperature_kl.cu",
        "  for (int offset = 16; offset > 0; offset >>= 1) {\n    kl::KlState<float> other;",
        "  for (int offset = 8; offset > 0; offset >>= 1) {\n    kl::KlState<float> other;",
        KL_TESTS, "test_matches_fp64_reference or test_reductions_and_row_counts"),
    Bug("divergent __syncthreads (only warp leaders wait)", "select_tokens.cu",
        "    if (lane == 0) warp_counts[warp] = __popc(ballot);\n    __syncthreads();\n",
        "    if (lane == 0) {\n      warp_counts[warp] = __popc(ballot);\n      __syncthreads();\n    }\n",
        SELECT_TESTS, "test_matches_reference"),
    Bug("dropped cudaFuncSetAttribute (> 48 KiB of dynamic shared memory)", "attention_importance.cu",
        "  if (shared_bytes + kStaticSharedBytes > 48 * 1024) {\n", "  if (false) {\n",
        ATTN_TESTS, "test_matches_reference_fp32"),
    Bug("static shared memory left out of the 48 KiB (counters up to 48 KiB beside warp_totals)",
        "gather_tokens.cu",
        "constexpr int64_t kMaxSharedDestinations = (48 * 1024 - kThreads / 32 * sizeof(int)) / sizeof(int);",
        "constexpr int64_t kMaxSharedDestinations = 48 * 1024 / sizeof(int);",
        "python_tests/ops/test_ops_shared_memory_limits.py", "test_gather_backward_counters"),
    Bug("removed __syncwarp (the leader moves the cursor before its peers read it)", "gather_tokens.cu",
        "      __syncwarp();  // every peer has read the cursor before the leader moves it\n", "",
        GATHER_TESTS, "test_repeated_indices_accumulate or test_gradcheck"),
    Bug("off-by-one in a scan (lane == offset skips its partner)", "gather_tokens.cu",
        "    if (lane >= offset) x += y;", "    if (lane > offset) x += y;",
        GATHER_TESTS, "test_repeated_indices_accumulate or test_gradcheck"),
    Bug("off-by-one in an index (a chosen lane counts itself)", "select_tokens.cu",
        "__popc(ballot & ((1u << lane) - 1u))", "__popc(ballot & ((2u << lane) - 1u))",
        SELECT_TESTS, "test_matches_reference"),
    Bug("dropped alignment check (16-byte loads of a misaligned row)", "temperature_kl.cu",
        "bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }",
        "bool is_aligned16(const void*) { return true; }",
        "python_tests/ops/test_ops_alignment.py", "test_temperature_kl_misaligned_base"),
]

PLANTED_DIR = emu.BUILD_DIR / "planted"
ORDERED_CONFIGS = ["132sm-forward", "1sm-reverse", "8sm-random"]


def plant(bug: Bug) -> pathlib.Path:
    """A copy of csrc/cuda with the bug; returns its folder."""
    src = emu.ROOT / "csrc" / "cuda"
    dst = PLANTED_DIR / bug.slug / "cuda"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    target = dst / bug.file
    text = target.read_text()
    count = text.count(bug.old)
    if count != 1:
        raise emu.BuildError(f"planted bug '{bug.name}': the text to replace occurs {count} times in {bug.file} "
                             "(the kernel changed: update tools/cuda_emu/planted.py)")
    target.write_text(text.replace(bug.old, bug.new))
    return dst


def build(bug: Bug) -> pathlib.Path:
    return emu.build_library("release", src=plant(bug), out=PLANTED_DIR / bug.slug, jobs=1)


def catch(bug: Bug, library: pathlib.Path) -> tuple[str | None, str]:
    """Runs the bug's tests under each configuration until one fails; returns (config, first failure) or None."""
    for config in ORDERED_CONFIGS:
        proc = emu.run_pytest(library, config, "release", ["-x", "-k", bug.select, "--tb=line"],
                              tests=[bug.tests], capture=True)
        if proc.returncode == 1:  # tests failed (2-5: interrupted, internal error, usage, nothing collected)
            lines = [ln for ln in proc.stdout.splitlines() if "cuda_emu" in ln or "Error" in ln or "assert" in ln]
            return config, (lines[0] if lines else proc.stdout.strip().splitlines()[-1])[:300]
        if proc.returncode < 0:  # the kernel wrote out of bounds and took the process down: caught, crudely
            return config, f"pytest killed by signal {-proc.returncode}"
        if proc.returncode != 0:
            return None, f"pytest exit {proc.returncode} under {config}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return None, "every configuration passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="substring of the bug names to run")
    args = parser.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or any(o in b.name for o in args.only)]
    start = time.perf_counter()
    emu.build_library("release")  # the unchanged objects the planted builds reuse
    with concurrent.futures.ThreadPoolExecutor(max_workers=emu.default_jobs()) as pool:
        libraries = dict(zip(bugs, pool.map(build, bugs)))
    print(f"planted bugs: {len(bugs)} builds ready in {time.perf_counter() - start:.0f} s", flush=True)
    missed = []
    for bug in bugs:
        t0 = time.perf_counter()
        config, detail = catch(bug, libraries[bug])
        took = time.perf_counter() - t0
        if config is None:
            missed.append(bug.name)
            print(f"NOT CAUGHT  {bug.name} ({took:.0f} s): {detail}", flush=True)
        else:
            print(f"caught      {bug.name} under {config} ({took:.0f} s): {detail}", flush=True)
    print(f"planted bugs: {len(bugs) - len(missed)} of {len(bugs)} caught in {time.perf_counter() - start:.0f} s",
          flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
