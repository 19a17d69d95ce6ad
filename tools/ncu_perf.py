"""make gpu-check's profiler part: the op calls of `make cuda-perf` (tools/cuda_emu/perf.py, same shapes and seeds)
run on the GPU under Nsight Compute, whose counters are written next to the emulator's figures.

Per kernel of each op call, ncu's sectors per request of global loads and stores
(l1tex__t_sectors_pipe_lsu_mem_global_op_{ld,st}.sum / l1tex__t_requests_...), its shared-memory bank conflicts and
wavefronts (l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{ld,st}.sum, l1tex__data_pipe_lsu_wavefronts_...),
DRAM bytes and the kernel's duration, beside the emulator's counts from bench/results/cuda_perf.csv. The result goes
to bench/results/cuda_perf_ncu-<device>.{md,csv}. One ncu process per op call, so that every profiled launch
belongs to that call; kernels that are not ours (torch's own, e.g. the index range check) are left out.

ncu's bank-conflict counter is the wavefronts beyond the ideal ones, so its "ways" here is wavefronts /
(wavefronts - conflicts), the emulator's definition; the hardware also counts conflicts the emulator does not model
(e.g. between the two halves of a 16-byte access), so the two may differ where the emulator shows 1.00.

Usage:
  python tools/ncu_perf.py report [--ncu PATH] [--only SUBSTRING ...]   what gpu-check runs; skips (exit 0, one line)
                                                                         without ncu or a GPU, unless --require
  python tools/ncu_perf.py run --case INDEX                              one op call on CUDA (the profiled process)
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
RESULTS_DIR = ROOT / "bench" / "results"

LD_SECTORS = "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"
LD_REQUESTS = "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"
ST_SECTORS = "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"
ST_REQUESTS = "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"
SMEM_CONFLICTS = ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                  "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum")
SMEM_WAVEFRONTS = ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
                   "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum")
DRAM = ("dram__bytes_read.sum", "dram__bytes_write.sum")
DURATION = "gpu__time_duration.sum"
METRICS = [LD_SECTORS, LD_REQUESTS, ST_SECTORS, ST_REQUESTS, *SMEM_CONFLICTS, *SMEM_WAVEFRONTS, *DRAM, DURATION]
# ncu prints values in these units with --print-units base; anything else is refused rather than misread.
UNIT_SCALE = {"": 1.0, "sector": 1.0, "request": 1.0, "byte": 1.0, "nsecond": 1e-9, "ns": 1e-9, "second": 1.0,
              "usecond": 1e-6, "msecond": 1e-3, "cycle": 1.0}
HEADER_START = '"ID","Process ID"'


def our_kernels() -> dict[str, str]:
    """Kernel name -> source file, for every __global__ function of csrc/cuda."""
    kernels = {}
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for name in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                               source.read_text()):
            kernels[name] = source.name
    return kernels


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv output (long form: one row per kernel launch and metric) -> one dict per launch, in launch order:
    {"id", "kernel", "metrics": {name: value in base units}}. Lines before the header (ncu's ==PROF== lines, the
    program's own output) and after it that are not CSV rows are skipped; thousands separators are removed."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(HEADER_START))
    except StopIteration:
        raise ValueError("no ncu CSV header in the output") from None
    rows = csv.DictReader(io.StringIO("\n".join(ln for ln in lines[start:] if ln.startswith('"'))))
    launches: dict[str, dict] = {}
    for row in rows:
        if row.get("ID") == "ID" or not row.get("Metric Name"):
            continue
        unit = (row.get("Metric Unit") or "").strip()
        if unit not in UNIT_SCALE:
            raise ValueError(f"unexpected unit {unit!r} for {row['Metric Name']} (run ncu with --print-units base)")
        raw = (row.get("Metric Value") or "").replace(",", "").strip()
        try:
            value = float(raw) * UNIT_SCALE[unit]
        except ValueError:
            raise ValueError(f"unreadable value {raw!r} for {row['Metric Name']}") from None
        launch = launches.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"], "metrics": {}})
        launch["metrics"][row["Metric Name"]] = value
    return sorted(launches.values(), key=lambda l: l["id"])


def base_name(kernel: str, known: dict[str, str]) -> str | None:
    """The csrc/cuda kernel a profiled name is (whatever ncu's name base: function, demangled), else None."""
    for name in known:
        if re.search(rf"\b{name}\b", kernel):
            return name
    return None


def per_kernel(launches: list[dict], known: dict[str, str]) -> dict[str, dict]:
    """Sums over the launches of each of our kernels (a kernel launched twice in one op call counts once, summed)."""
    out: dict[str, dict] = {}
    for launch in launches:
        name = base_name(launch["kernel"], known)
        if name is None:
            continue
        acc = out.setdefault(name, {m: 0.0 for m in METRICS} | {"launches": 0})
        acc["launches"] += 1
        for m in METRICS:
            acc[m] += launch["metrics"].get(m, 0.0)
    return out


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def figures(acc: dict) -> dict:
    wave = sum(acc[m] for m in SMEM_WAVEFRONTS)
    conflicts = sum(acc[m] for m in SMEM_CONFLICTS)
    return {"ncu_ld_sectors_per_request": ratio(acc[LD_SECTORS], acc[LD_REQUESTS]),
            "ncu_st_sectors_per_request": ratio(acc[ST_SECTORS], acc[ST_REQUESTS]),
            "ncu_smem_wavefronts": wave, "ncu_smem_conflicts": conflicts,
            "ncu_bank_ways": ratio(wave, wave - conflicts) if wave else None,
            "ncu_dram_bytes": sum(acc[m] for m in DRAM), "ncu_us": acc[DURATION] * 1e6}


def join(emu_rows: list[dict], measured: dict[str, dict[str, dict]], known: dict[str, str]) -> list[dict]:
    """Emulator rows (bench/results/cuda_perf.csv) with the ncu figures of the same op call and kernel.

    measured: op call name ("op model shape") -> kernel -> summed metrics. The emulator names a kernel launched
    through a variable by its launch site ("kernel@gather_tokens.cu:314"): it takes the kernels of that file that no
    other row of the op call names."""
    out = []
    by_call: dict[str, list[dict]] = {}
    for row in emu_rows:
        by_call.setdefault(f"{row['op']} {row['model']} {row['shape']}", []).append(row)
    for call, rows in by_call.items():
        kernels = measured.get(call)
        named = {k for r in rows for k in (kernels or {}) if not r["kernel"].startswith("kernel@")
                 and k.endswith(r["kernel"])}
        for row in rows:
            joined = dict(row)
            if kernels is not None:
                if row["kernel"].startswith("kernel@"):
                    file = row["kernel"].removeprefix("kernel@").split(":")[0]
                    matches = [k for k in kernels if known.get(k) == file and k not in named]
                else:
                    matches = [k for k in kernels if k.endswith(row["kernel"])]
                if matches:
                    acc = {m: sum(kernels[k][m] for k in matches) for m in METRICS}
                    joined.update(figures(acc), ncu_kernels=" + ".join(matches))
            out.append(joined)
    return out


def _fmt(x, spec="{:.2f}"):
    return "-" if x in (None, "") else spec.format(float(x))


def render(rows: list[dict], device: str, header: str) -> str:
    lines = [f"# CUDA kernels' memory counters on {device}: Nsight Compute next to the emulator", "", header, "",
             "`sec/req`: 32-byte sectors per warp-level request of global loads (ld) and stores (st); `ways`: "
             "shared-memory wavefronts / ideal wavefronts (ncu: wavefronts / (wavefronts - bank conflicts)); "
             "`DRAM MB`: ncu's DRAM bytes read + written by the kernel (the emulator's `moved` counts every request "
             "as DRAM traffic, an upper bound); `us`: ncu's kernel duration against the emulator's H100 model of "
             "the whole op call.", "",
             "| op | model | shape | kernel | ld sec/req emu / ncu | st sec/req emu / ncu | ways emu / ncu | "
             "ncu conflicts / wavefronts | op moved MB (emu) | DRAM MB (ncu) | op model us (emu) | us (ncu) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['shape']} | {r['kernel']} | "
            f"{_fmt(r.get('load_sectors_per_request'))} / {_fmt(r.get('ncu_ld_sectors_per_request'))} | "
            f"{_fmt(r.get('store_sectors_per_request'))} / {_fmt(r.get('ncu_st_sectors_per_request'))} | "
            f"{_fmt(r.get('bank_ways_mean'))} / {_fmt(r.get('ncu_bank_ways'))} | "
            f"{_fmt(r.get('ncu_smem_conflicts'), '{:.0f}')} / {_fmt(r.get('ncu_smem_wavefronts'), '{:.0f}')} | "
            f"{_fmt(float(r['moved_bytes']) / 1e6, '{:.3f}')} | "
            f"{_fmt(r['ncu_dram_bytes'] / 1e6 if r.get('ncu_dram_bytes') is not None else None, '{:.3f}')} | "
            f"{_fmt(r.get('h100_model_us'))} | {_fmt(r.get('ncu_us'))} |")
    return "\n".join(lines) + "\n"


# ---- the profiled process ------------------------------------------------------------------------------------------
def run_case(index: int) -> int:
    import torch  # noqa: PLC0415

    import epic_ext  # noqa: PLC0415, F401  (registers the ops)
    import perf  # noqa: PLC0415

    call, _ = perf.cases(device="cuda")[index].run()
    call()
    torch.cuda.synchronize()
    return 0


# ---- driving -------------------------------------------------------------------------------------------------------
def skip(message: str, require: bool) -> int:
    print(f"ncu_perf: skipped: {message}", flush=True)
    return 1 if require else 0


def find_ncu() -> str | None:
    """ncu on PATH, else where the CUDA toolkit and standalone Nsight Compute installs put it."""
    candidates = [shutil.which("ncu"), "/usr/local/cuda/bin/ncu",
                  *sorted(map(str, pathlib.Path("/opt/nvidia").glob("nsight-compute/*/ncu")), reverse=True)]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def report(ncu: str | None, only: list[str] | None, require: bool) -> int:
    ncu = ncu or find_ncu()
    if not ncu:
        return skip("Nsight Compute's `ncu` is not on PATH (install the CUDA toolkit's nsight-compute, or pass "
                    "--ncu PATH)", require)
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return skip("no CUDA device", require)
    emu_csv = RESULTS_DIR / "cuda_perf.csv"
    if not emu_csv.exists():
        return skip(f"{emu_csv.relative_to(ROOT)} is missing (make cuda-perf writes it)", require)
    import perf  # noqa: PLC0415

    known = our_kernels()
    start = time.perf_counter()
    measured: dict[str, dict[str, dict]] = {}
    failures = []
    for index, case in enumerate(perf.cases(device="cpu")):  # names only: no tensors are made here
        if only and not any(o in case.name for o in only):
            continue
        cmd = [ncu, "--csv", "--print-units", "base", "--metrics", ",".join(METRICS), "--target-processes", "all",
               sys.executable, __file__, "run", "--case", str(index)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0 or "ERR_NVGPUCTRPERM" in proc.stdout + proc.stderr:
            failures.append(case.name)
            print(f"ncu_perf: {case.name}: ncu failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                  f"{proc.stderr[-2000:]}", flush=True)
            continue
        try:
            measured[case.name] = per_kernel(parse_ncu_csv(proc.stdout), known)
        except ValueError as exc:
            failures.append(case.name)
            print(f"ncu_perf: {case.name}: {exc}", flush=True)
            continue
        print(f"ncu_perf: profiled {case.name}: {', '.join(measured[case.name]) or 'none of our kernels'}",
              flush=True)
    with open(emu_csv, newline="") as f:
        emu_rows = list(csv.DictReader(f))
    rows = [r for r in join(emu_rows, measured, known)
            if f"{r['op']} {r['model']} {r['shape']}" in measured]
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", device)
    ncu_version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    header = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
              f"{ncu_version[-1] if ncu_version else 'ncu'}; emulator figures from "
              f"bench/results/cuda_perf.csv (commit {emu_rows[0]['commit'] if emu_rows else '?'}); "
              f"{time.perf_counter() - start:.0f} s.")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"cuda_perf_ncu-{slug}.md").write_text(render(rows, device, header))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(RESULTS_DIR / f"cuda_perf_ncu-{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(render(rows, device, header))
    if failures:
        print(f"ncu_perf: {len(failures)} op calls not profiled: {'; '.join(failures)}", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report")
    p.add_argument("--ncu")
    p.add_argument("--only", action="append")
    p.add_argument("--require", action="store_true", help="exit 1 instead of skipping without ncu or a GPU")
    p = sub.add_parser("run")
    p.add_argument("--case", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_case(args.case)
    return report(args.ncu, args.only, args.require)


if __name__ == "__main__":
    sys.exit(main())
