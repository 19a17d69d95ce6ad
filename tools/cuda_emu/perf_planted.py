"""Proof that the memory-traffic report catches performance bugs: each bug below is planted in a copy of csrc/cuda
(like tools/cuda_emu/planted.py does for correctness bugs), the copy is built with the perf variant, and the named
op call must fail the named check of tools/cuda_emu/perf.py. Run by `make cuda-perf-planted` and by
python_tests/tools/test_cuda_perf.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import emu  # noqa: E402
import perf  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PerfBug:
    name: str
    file: str  # under csrc/cuda
    edits: tuple[tuple[str, str], ...]  # (old, new); each old must occur exactly once
    case: str  # substring of the op call (perf.Case.name) that must be flagged
    check: str  # substring of the failure that must appear

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


BUGS = [
    PerfBug("uncoalesced (transposed) chunk index in temperature_kl's backward", "temperature_kl.cu",
            (("""    for (int c = threadIdx.x; c < num_chunks; c += kBackwardThreads) {
      float v[kChunk];
      Chunk<T, kChunk>::template load<true>(in_row + c * kChunk, v);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] *= factor;
      Chunk<T, kChunk>::store(out_row + c * kChunk, v);""",
              """    const int per_thread = num_chunks / kBackwardThreads;
    for (int cc = threadIdx.x; cc < per_thread * kBackwardThreads; cc += kBackwardThreads) {
      const int c = (cc % kBackwardThreads) * per_thread + cc / kBackwardThreads;  // thread-major: transposed
      float v[kChunk];
      Chunk<T, kChunk>::template load<true>(in_row + c * kChunk, v);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] *= factor;
      Chunk<T, kChunk>::store(out_row + c * kChunk, v);"""),),
            "temperature_kl_backward LLaVA", "streaming efficiency"),
    PerfBug("shared-memory layout with a 32-float stride (attention key sums lane-major)",
            "attention_importance.cu",
            (("  __shared__ float key_sums[kWarps][32];", "  __shared__ float key_sums[32][32];"),
             ("  key_sums[warp][lane] = acc;", "  key_sums[lane][warp] = acc;"),
             ("sum += key_sums[q * p.key_groups + g][l];", "sum += key_sums[l][q * p.key_groups + g];")),
            "attention_importance LLaVA", "bank conflicts"),
    PerfBug("extra pass over the logits (a separate max pass before the online softmax)", "temperature_kl.cu",
            (("""    kl::KlState<float> st = kl::kl_state_empty<float>();
    int c = threadIdx.x;""", """    float pre_max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      pre_max = fmaxf(pre_max, fmaxf(to_float(student_row[i]), to_float(teacher_row_ptr[i])));
    }
    if (pre_max == 1234.5f) row_loss[row] = 0.0f;  // keeps the pass
    kl::KlState<float> st = kl::kl_state_empty<float>();
    int c = threadIdx.x;"""),),
            "temperature_kl LLaVA-1.5-7B [16, 32000] bfloat16 +grad", "bytes moved"),
]


def plant(bug: PerfBug) -> pathlib.Path:
    dst = perf.PLANTED_DIR / bug.slug / "cuda"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(emu.ROOT / "csrc" / "cuda", dst)
    target = dst / bug.file
    text = target.read_text()
    for old, new in bug.edits:
        if text.count(old) != 1:
            raise emu.BuildError(f"planted perf bug '{bug.name}': the text to replace occurs {text.count(old)} times "
                                 f"in {bug.file} (the kernel changed: update tools/cuda_emu/perf_planted.py)")
        text = text.replace(old, new)
    target.write_text(text)
    return dst


def run(bugs: list[PerfBug] | None = None) -> list[tuple[PerfBug, list[str]]]:
    """Builds and measures each bug; returns (bug, the failures perf reports for its op call)."""
    emu.build_library("perf")  # the unchanged objects the planted builds reuse
    out = []
    for bug in bugs or BUGS:
        folder = perf.PLANTED_DIR / bug.slug
        library = emu.build_library("perf", src=plant(bug), out=folder, jobs=1)
        results = perf.run_measure(library, [bug.case], folder / "cuda_perf.json")
        failures = [f for r in results for f in perf.summarize(r)["failures"]]
        out.append((bug, failures))
    return out


def main() -> int:
    start = time.perf_counter()
    missed = 0
    for bug, failures in run():
        caught = any(bug.check in f for f in failures)
        missed += not caught
        print(f"{'flagged    ' if caught else 'NOT FLAGGED'} {bug.name}: {'; '.join(failures) or 'no failure'}",
              flush=True)
    print(f"planted performance bugs: {len(BUGS) - missed} of {len(BUGS)} flagged in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
