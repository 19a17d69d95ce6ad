"""Shared benchmark machinery: device description, measured peaks, timing, the printed table and the CSV rows.

Peaks are measured in the same run (a large device-to-device copy for bandwidth, a large matmul for FLOP rate),
never taken from datasheets, so "% of peak" compares like with like on the machine at hand.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import pathlib
import platform
import subprocess
import time
from dataclasses import dataclass, field

import torch

import epic_ext

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds of fn() with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


@functools.lru_cache(maxsize=None)
def measured_copy_bandwidth(device: str) -> float:
    """Bytes/s of a large out-of-place copy (read + write counted), best of several."""
    n_bytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = time_call(lambda: dst.copy_(src), device, warmup=2, repeats=7)
    return 2 * n_bytes / best


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / seconds


class PeakMemory:
    """Peak extra memory of a call: CUDA allocator peak, or the process's peak RSS on CPU (Linux)."""

    def __init__(self, device: str):
        self.device = device
        self.extra_bytes = 0

    @staticmethod
    def _rss_kib(field_name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        return 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:  # reset VmHWM to the current RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self._base = self._rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self.extra_bytes = max(0, self._rss_kib("VmHWM") * 1024 - self._base)
        return False


@dataclass
class Row:
    bench: str
    provider: str
    shape: str
    dtype: str
    ms: float
    rate: float  # GB/s or TFLOP/s
    rate_unit: str
    pct_of_peak: float
    peak_mem_mb: float
    extra: dict = field(default_factory=dict)


class Recorder:
    """Collects rows of one benchmark file, prints them as a table and appends them to bench/results/<name>.csv."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.device = device
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def table(self) -> str:
        head = f"{'provider':<22} {'shape':<20} {'dtype':<9} {'ms':>10} {'rate':>14} {'% peak':>7} {'peak MB':>9}  notes"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            notes = " ".join(f"{k}={v}" for k, v in r.extra.items())
            lines.append(
                f"{r.provider:<22} {r.shape:<20} {r.dtype:<9} {r.ms:>10.3f} {r.rate:>9.1f} {r.rate_unit:<4} "
                f"{r.pct_of_peak:>6.1f}% {r.peak_mem_mb:>9.1f}  {notes}"
            )
        return "\n".join(lines)

    def write_csv(self, peaks: dict) -> pathlib.Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.csv"
        new = not path.exists()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta = {
            "timestamp": stamp,
            "device": device_name(self.device),
            "torch": torch.__version__,
            "epic_ext": epic_ext.__version__,
            "commit": git_commit(),
            **{k: f"{v:.4g}" for k, v in peaks.items()},
        }
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            columns = ["bench", "provider", "shape", "dtype", "ms", "rate", "rate_unit", "pct_of_peak",
                       "peak_mem_mb", "notes", *meta.keys()]
            if new:
                writer.writerow(columns)
            for r in self.rows:
                notes = ";".join(f"{k}={v}" for k, v in r.extra.items())
                writer.writerow([r.bench, r.provider, r.shape, r.dtype, f"{r.ms:.4f}", f"{r.rate:.2f}", r.rate_unit,
                                 f"{r.pct_of_peak:.1f}", f"{r.peak_mem_mb:.1f}", notes, *meta.values()])
        return path


def bench_device() -> str:
    requested = os.environ.get("EPIC_BENCH_DEVICE")
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
