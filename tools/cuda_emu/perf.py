"""cuda_perf: the memory traffic of the CUDA kernels, counted by the emulator at shapes scaled from the real models.

The kernels are built with the perf variant of tools/cuda_emu (every load and store reported to the runtime, see
tools/cuda_emu/PERF.md) and each op runs once per shape. Per kernel: global loads and stores per warp-level
request, sectors per request, efficiency (bytes asked for / bytes in the sectors touched), shared-memory requests
and bank-conflict ways; per op call: sectors moved against the op's minimum (each input read once, each output
written once) and a modelled H100 time. Everything here is counted, not timed: the H100 time is a model.

Usage:
  python tools/cuda_emu/perf.py report [--only SUBSTRING ...]   what `make cuda-perf` runs: build, measure, check,
                                                                write bench/results/cuda_perf.{md,csv}
  python tools/cuda_emu/perf.py planted                         planted performance bugs: each must be flagged
  python tools/cuda_emu/perf.py measure --library LIB --json OUT [--only ...]   (one process per library)
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import emu  # noqa: E402

RESULTS_DIR = emu.ROOT / "bench" / "results"
PLANTED_DIR = emu.BUILD_DIR / "perf-planted"

# The thresholds (PERF.md): streaming global accesses, traffic against the minimum, bank conflicts.
MIN_EFFICIENCY = 0.90
MAX_TRAFFIC_RATIO = 1.25
MAX_BANK_WAYS = 1.1
# An instruction is "streaming" when it moves at least this share of its op call's sectors and its lanes ask for
# more than one sector's worth of bytes per request; the rest (a row index or per-row scale read by every lane, a
# handful of statistics) cannot decide the kernel's speed, whatever their pattern.
STREAMING_SHARE = 0.01
H100_BYTES_PER_S = 3.35e12  # HBM3 peak of an H100 SXM (datasheet): the model's only hardware number
SECTOR = 32

# Shapes: LLaVA-1.5-7B (Vicuna-7B: vocabulary 32000, hidden 4096, 32 heads of 128, 576 visual tokens) and
# Qwen2.5-VL-7B (vocabulary 152064, hidden 3584, 28 query / 4 kv heads of 128). Row and token counts are scaled
# down so that the whole report emulates in minutes; the widths (V, D, heads) are the real ones.
LLAVA = dict(model="LLaVA-1.5-7B", vocab=32000, hidden=4096, heads=32, kv_heads=32, head_dim=128, seq=640,
             span=576, keep=128, span_start=35)
QWEN = dict(model="Qwen2.5-VL-7B", vocab=152064, hidden=3584, heads=28, kv_heads=4, head_dim=128, seq=1400,
            span=1296, keep=324, span_start=15)
KL_ROWS = 16


@dataclasses.dataclass
class Case:
    op: str
    model: str
    shape: str
    run: Callable[[], tuple[Callable[[], object], int]]  # -> (the op call, the op's minimum bytes)
    # Algorithms that must move more than the op's minimum: (their own minimum in bytes, why). The ratio is then
    # also checked against that minimum, with the same 1.25.
    structural: Callable[[], int] | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.op} {self.model} {self.shape}"


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(device: str = "cpu") -> list[Case]:
    """The op calls; their inputs are made on the CPU (same values everywhere) and moved to `device` ("cuda": the
    same calls under Nsight Compute, tools/ncu_perf.py)."""
    import torch  # noqa: PLC0415

    ops = torch.ops.epic_ext
    out: list[Case] = []

    def kl(m: dict, dtype: torch.dtype, grad: bool, teacher_dtype: torch.dtype | None = None) -> Case:
        # teacher_dtype: a teacher in another dtype than the student (the kernel then steps by 16 bytes of the
        # wider one, the narrower reading 8 bytes per lane).
        n, v = KL_ROWS, m["vocab"]
        teacher_dtype = teacher_dtype or dtype
        es = torch.tensor([], dtype=dtype).element_size()
        et = torch.tensor([], dtype=teacher_dtype).element_size()

        def run():
            g = torch.Generator().manual_seed(0)
            student = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device)
            teacher = (torch.randn(n, v, generator=g) * 3).to(teacher_dtype).to(device)
            return (lambda: ops.temperature_kl(student, teacher, None, 2.0, 4.0, grad),
                    _nbytes(student, teacher) + n * 4 + (n * v * es if grad else 0))

        dt = str(dtype).removeprefix("torch.")
        if teacher_dtype != dtype:
            dt += "/" + str(teacher_dtype).removeprefix("torch.")
        return Case("temperature_kl", m["model"], f"[{n}, {v}] {dt}{' +grad' if grad else ''}", run,
                    structural=(lambda: 2 * n * v * (es + et) + n * 4 + n * v * es) if grad else None,
                    reason="the gradient of an element needs the row's softmax sums, known only after a full read: "
                           "the gradient sweep reads the row a second time (sized to come from L2, which the model "
                           "does not see)" if grad else "")

    def kl_backward(m: dict, dtype: torch.dtype) -> Case:
        n, v = KL_ROWS, m["vocab"]

        def run():
            g = torch.Generator().manual_seed(1)
            grad = torch.randn(n, v, generator=g).to(dtype).to(device)
            grad_rows = torch.rand(n, generator=g).to(device)
            return lambda: ops.temperature_kl_backward(grad, grad_rows), 2 * _nbytes(grad) + _nbytes(grad_rows)

        return Case("temperature_kl_backward", m["model"], f"[{n}, {v}] {str(dtype).removeprefix('torch.')}", run)

    def attention(m: dict) -> Case:
        b, r, d, L = 1, 1, m["head_dim"], m["seq"]

        def run():
            g = torch.Generator().manual_seed(2)
            q = torch.randn(b, m["heads"], r, d, generator=g).to(torch.bfloat16).to(device)
            k = torch.randn(b, m["kv_heads"], L, d, generator=g).to(torch.bfloat16).to(device)
            return lambda: ops.attention_importance(q, k, None, None, None), _nbytes(q, k) + b * L * 4

        kv_bytes = b * m["kv_heads"] * L * d * 2
        q_bytes = b * m["heads"] * r * d * 2
        return Case("attention_importance", m["model"],
                    f"q [{b}, {m['heads']}, {r}, {d}] k [{b}, {m['kv_heads']}, {L}, {d}] bf16", run,
                    structural=lambda: 2 * (kv_bytes + q_bytes) + b * L * 4,
                    reason="a probability needs its row's softmax denominator, a sum over every key: pass 1 reads K "
                           "for the row statistics, pass 2 reads it again (the contract forbids holding the "
                           "[B, H, R, L] scores that would avoid it)")

    def select(m: dict) -> Case:
        b = 2

        def run():
            g = torch.Generator().manual_seed(3)
            scores = torch.rand(b, m["seq"], generator=g).to(device)
            start = torch.full((b,), m["span_start"], dtype=torch.long).to(device)
            return (lambda: ops.select_tokens(scores, start, m["span"], m["keep"]),
                    b * m["span"] * 4 + _nbytes(start) + b * m["keep"] * 8)

        return Case("select_tokens", m["model"], f"scores [{b}, {m['seq']}] fp32 span {m['span']} keep {m['keep']}",
                    run)

    def gather(m: dict, kv: bool, backward: bool) -> Case:
        b, L = 1, m["seq"]
        k_rows = m["keep"] + (L - m["span"])  # kept visual tokens and every text token
        shape = [b, m["kv_heads"], L, m["head_dim"]] if kv else [b, L, m["hidden"]]
        dim = 2 if kv else 1
        row = shape[-1] * 2 * (m["kv_heads"] if kv else 1)  # bytes of one token across the gathered dims

        def run():
            g = torch.Generator().manual_seed(4)
            index = torch.sort(torch.randperm(L, generator=g)[:k_rows]).values.unsqueeze(0).to(device)
            if not backward:
                x = torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)
                return lambda: ops.gather_tokens(x, index, dim), 2 * k_rows * row + _nbytes(index)
            out_shape = list(shape)
            out_shape[dim] = k_rows
            grad = torch.randn(*out_shape, generator=g).to(torch.bfloat16).to(device)
            return (lambda: ops.gather_tokens_backward(grad, index, dim, L),
                    _nbytes(grad, index) + L * row)

        what = f"{'kv' if kv else 'hidden'} {shape} bf16 -> {k_rows} rows"
        return Case("gather_tokens_backward" if backward else "gather_tokens", m["model"], what, run)

    for m in (LLAVA, QWEN):
        out += [kl(m, torch.bfloat16, True), kl(m, torch.bfloat16, False), kl(m, torch.float32, True),
                kl(m, torch.float32, True, torch.bfloat16), kl_backward(m, torch.bfloat16),
                kl_backward(m, torch.float32), attention(m), select(m)]
        out += [gather(m, kv, bw) for kv in (False, True) for bw in (False, True)]
    return out


# ---- measuring (inside the process that loaded the perf library) ---------------------------------------------------
def measure(library: pathlib.Path, only: list[str] | None) -> list[dict]:
    import ctypes  # noqa: PLC0415

    import torch  # noqa: PLC0415, F401

    import torch_emu  # noqa: PLC0415

    torch_emu.load(library)
    lib = ctypes.CDLL(str(library))
    lib.cuda_emu_perf_json.restype = ctypes.c_char_p
    if not lib.cuda_emu_perf_enabled():
        raise SystemExit(f"{library} is not a perf build (emu.py build --variant perf)")
    results = []
    for case in cases():
        if only and not any(o in case.name for o in only):
            continue
        call, minimum = case.run()
        t0 = time.perf_counter()
        lib.cuda_emu_perf_reset()
        with torch_emu.kernels_on_cpu():
            call()
        launches = json.loads(lib.cuda_emu_perf_json().decode())
        results.append(dict(op=case.op, model=case.model, shape=case.shape, minimum=minimum,
                            structural=case.structural() if case.structural else None, reason=case.reason,
                            launches=launches, emulated_s=time.perf_counter() - t0))
        print(f"cuda_perf: measured {case.name} ({results[-1]['emulated_s']:.1f} s)", flush=True)
    return results


# ---- figures and checks ---------------------------------------------------------------------------------------------
def _site_lines(sites: list[str]) -> dict[str, str]:
    """object+0xoffset -> file:line, through addr2line (the perf build has -g)."""
    by_object = collections.defaultdict(list)
    for s in sites:
        obj, _, off = s.rpartition("+")
        by_object[obj].append(off)
    names = {}
    for obj, offsets in by_object.items():
        if not obj or not shutil.which("addr2line"):
            continue
        proc = subprocess.run(["addr2line", "-e", obj, *offsets], capture_output=True, text=True)
        for off, line in zip(offsets, proc.stdout.splitlines()):
            names[f"{obj}+{off}"] = line.split(" (")[0].replace(str(emu.ROOT) + "/", "")
    return names


def summarize(result: dict) -> dict:
    """Per-kernel figures, the op call's totals and the checks that fail (list of strings)."""
    kernels: dict[str, collections.Counter] = {}
    sites: dict[str, list[dict]] = collections.defaultdict(list)
    total_sectors = sum(l["load_sectors"] + l["store_sectors"] + l["atomic_sectors"] for l in result["launches"])
    for launch in result["launches"]:
        name = launch["kernel"].split("<")[0]
        if name == "kernel":  # launched through a variable: name the launch site instead
            name = f"kernel@{launch['file'].rsplit('/', 1)[-1]}:{launch['line']}"
        k = kernels.setdefault(name, collections.Counter())
        for key in ("load_requests", "load_sectors", "load_bytes", "store_requests", "store_sectors", "store_bytes",
                    "atomic_requests", "atomic_sectors", "atomic_bytes", "shared_requests", "shared_wavefronts",
                    "shared_ideal_wavefronts"):
            k[key] += launch[key]
        k["shared_worst_ways"] = max(k["shared_worst_ways"], launch["shared_worst_ways"])
        for site in launch["sites"]:
            streaming = (not site["shared"] and site["sectors"] >= STREAMING_SHARE * total_sectors
                         and site["bytes"] > SECTOR * site["requests"])
            if streaming:
                k["streaming_sectors"] += site["sectors"]
                k["streaming_bytes"] += site["bytes"]
            sites[name].append(dict(site, streaming=streaming))
    failures = []
    rows = []
    for name, k in kernels.items():
        row = dict(kernel=name)
        for kind in ("load", "store"):
            req, sec, byt = k[f"{kind}_requests"], k[f"{kind}_sectors"], k[f"{kind}_bytes"]
            row[f"{kind}_requests"] = req
            row[f"{kind}_sectors_per_request"] = sec / req if req else None
            row[f"{kind}_efficiency"] = byt / (SECTOR * sec) if sec else None
        row["atomic_requests"] = k["atomic_requests"]
        row["streaming_efficiency"] = (k["streaming_bytes"] / (SECTOR * k["streaming_sectors"])
                                       if k["streaming_sectors"] else None)
        row["shared_requests"] = k["shared_requests"]
        row["bank_ways_mean"] = (k["shared_wavefronts"] / k["shared_ideal_wavefronts"]
                                 if k["shared_ideal_wavefronts"] else None)
        row["bank_ways_worst"] = k["shared_worst_ways"] if k["shared_requests"] else None
        row["sites"] = sites[name]
        if row["streaming_efficiency"] is not None and row["streaming_efficiency"] < MIN_EFFICIENCY:
            failures.append(f"{name}: streaming efficiency {row['streaming_efficiency']:.1%} < {MIN_EFFICIENCY:.0%}")
        if row["bank_ways_mean"] is not None and row["bank_ways_mean"] > MAX_BANK_WAYS:
            failures.append(f"{name}: bank conflicts {row['bank_ways_mean']:.2f} ways > {MAX_BANK_WAYS}")
        rows.append(row)
    moved = SECTOR * total_sectors
    requested = sum(l["load_bytes"] + l["store_bytes"] + l["atomic_bytes"] for l in result["launches"])
    ratio = moved / result["minimum"]
    structural_ratio = moved / result["structural"] if result["structural"] else None
    if structural_ratio is None and ratio > MAX_TRAFFIC_RATIO:
        failures.append(f"bytes moved {ratio:.2f}x the op's minimum > {MAX_TRAFFIC_RATIO}")
    if structural_ratio is not None and structural_ratio > MAX_TRAFFIC_RATIO:
        failures.append(f"bytes moved {structural_ratio:.2f}x the algorithm's stated minimum > {MAX_TRAFFIC_RATIO}")
    return dict(kernels=rows, moved=moved, requested=requested, ratio=ratio, structural_ratio=structural_ratio,
                efficiency=requested / moved if moved else None,
                model_us=moved / H100_BYTES_PER_S * 1e6, failures=failures)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def render(results: list[dict], title: str) -> tuple[str, list[dict]]:
    lines = [f"# {title}", "",
             "Counted by the CUDA emulator (tools/cuda_emu/PERF.md), not measured on a GPU. `ld`/`st`: global "
             "loads/stores, warp-level requests; `sec/req`: 32-byte sectors per request; `eff`: bytes asked for / "
             "bytes in the sectors touched; `stream eff`: the same over the instructions that move >= 1% of the op "
             "call's sectors (threshold 90%); `smem ways`: shared-memory wavefronts / ideal (mean, worst; threshold "
             "1.1 mean); `moved/min`: sectors moved x 32 B / the op's minimum (each input read once, each output "
             "written once; threshold 1.25, or against the stated minimum of an algorithm that must re-read); "
             "`H100 model`: bytes moved / 3.35 TB/s, i.e. bytes asked for / (3.35 TB/s x efficiency), a model "
             "that sees no caches, latency or instruction limits.", "",
             "| op | model | shape | kernel | ld req | ld sec/req | ld eff | st req | st sec/req | st eff | "
             "stream eff | smem req | smem ways mean / worst |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    csv_rows = []
    totals = ["", "| op | model | shape | moved (MB) | min (MB) | moved/min | stated min | eff | H100 model (us) | "
                  "flags |", "|---|---|---|---|---|---|---|---|---|---|"]
    flagged_sites = []
    for r in results:
        s = summarize(r)
        for k in s["kernels"]:
            lines.append(f"| {r['op']} | {r['model']} | {r['shape']} | {k['kernel']} | {k['load_requests']} | "
                         f"{_num(k['load_sectors_per_request'])} | {_pct(k['load_efficiency'])} | "
                         f"{k['store_requests']} | {_num(k['store_sectors_per_request'])} | "
                         f"{_pct(k['store_efficiency'])} | {_pct(k['streaming_efficiency'])} | "
                         f"{k['shared_requests']} | {_num(k['bank_ways_mean'])} / {_num(k['bank_ways_worst'])} |")
            for site in k["sites"]:
                bad_eff = site["streaming"] and site["sectors"] and site["bytes"] / (SECTOR * site["sectors"]) < MIN_EFFICIENCY
                bad_ways = site["shared"] and site["ideal"] and site["wavefronts"] / site["ideal"] > MAX_BANK_WAYS
                if bad_eff or bad_ways:
                    flagged_sites.append((r, k["kernel"], site))
            csv_rows.append({"op": r["op"], "model": r["model"], "shape": r["shape"], "kernel": k["kernel"],
                             **{c: k[c] for c in ("load_requests", "load_sectors_per_request", "load_efficiency",
                                                   "store_requests", "store_sectors_per_request", "store_efficiency",
                                                   "streaming_efficiency", "shared_requests", "bank_ways_mean",
                                                   "bank_ways_worst")},
                             "moved_bytes": s["moved"], "minimum_bytes": r["minimum"], "moved_over_min": s["ratio"],
                             "moved_over_stated_min": s["structural_ratio"], "h100_model_us": s["model_us"],
                             "flags": "; ".join(s["failures"])})
        totals.append(f"| {r['op']} | {r['model']} | {r['shape']} | {s['moved'] / 1e6:.3f} | "
                      f"{r['minimum'] / 1e6:.3f} | {s['ratio']:.2f} | {_num(s['structural_ratio'])} | "
                      f"{_pct(s['efficiency'])} | {s['model_us']:.2f} | "
                      f"{'; '.join(s['failures']) or 'ok'} |")
    lines += totals
    reasons = {(r["op"], r["reason"]) for r in results if r["reason"]}
    if reasons:
        lines += ["", "Stated minimums (algorithms that must move more than the op's minimum):", ""]
        lines += [f"- {op}: {why}." for op, why in sorted(reasons)]
    if flagged_sites:
        names = _site_lines([s["site"] for _, _, s in flagged_sites])
        lines += ["", "Instructions past a threshold:", ""]
        for r, kernel, site in flagged_sites:
            where = names.get(site["site"], site["site"])
            what = (f"{site['wavefronts'] / site['ideal']:.2f} ways" if site["shared"]
                    else f"{site['sectors'] / site['requests']:.2f} sectors/request, "
                         f"{site['bytes'] / (SECTOR * site['sectors']):.1%}")
            lines.append(f"- {r['op']} {r['model']} {r['shape']}: {kernel} {site['access']} at {where}: {what}")
    return "\n".join(lines) + "\n", csv_rows


# ---- driving ------------------------------------------------------------------------------------------------------
def run_measure(library: pathlib.Path, only: list[str] | None, json_out: pathlib.Path) -> list[dict]:
    """measure() in a fresh process: one emulated library per process (it registers the CUDA kernels)."""
    cmd = [sys.executable, __file__, "measure", "--library", str(library), "--json", str(json_out)]
    for o in only or []:
        cmd += ["--only", o]
    env = dict(os.environ, CUDA_EMU_WORKERS=os.environ.get("CUDA_EMU_WORKERS", "2"))
    proc = subprocess.run(cmd, cwd=emu.ROOT, env=env)
    if proc.returncode != 0:
        raise emu.BuildError(f"cuda_perf: measuring with {library} failed (exit {proc.returncode})")
    return json.loads(json_out.read_text())


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=emu.ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "csrc/cuda", "tools/cuda_emu"], cwd=emu.ROOT,
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def report(only: list[str] | None) -> int:
    start = time.perf_counter()
    library = emu.build_library("perf")
    out_json = emu.BUILD_DIR / "perf" / "cuda_perf.json"
    results = run_measure(library, only, out_json)
    text, csv_rows = render(results, "CUDA kernels' memory traffic (emulator counts)")
    print(text)
    failures = [(r, f) for r in results for f in summarize(r)["failures"]]
    if not only:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        import torch  # noqa: PLC0415

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"Commit {_commit()}, {stamp}, torch {torch.__version__}, counted by tools/cuda_emu "
                  f"(perf build, g++ {_gxx_version()}); `make cuda-perf` took {time.perf_counter() - start:.0f} s.\n\n")
        (RESULTS_DIR / "cuda_perf.md").write_text(text.replace("\n\n", "\n\n" + header, 1))
        with open(RESULTS_DIR / "cuda_perf.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["commit", "device", *csv_rows[0].keys()])
            writer.writeheader()
            for row in csv_rows:
                writer.writerow({"commit": _commit(), "device": "cuda_emu count (H100 model)", **row})
    print(f"cuda_perf: {len(results)} op calls in {time.perf_counter() - start:.0f} s; "
          + (f"{len(failures)} past a threshold" if failures else "every threshold held"), flush=True)
    return 1 if failures else 0


def _gxx_version() -> str:
    return subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report")
    p.add_argument("--only", action="append")
    p = sub.add_parser("measure")
    p.add_argument("--library", required=True, type=pathlib.Path)
    p.add_argument("--json", required=True, type=pathlib.Path)
    p.add_argument("--only", action="append")
    sub.add_parser("planted")
    args = parser.parse_args(argv)
    try:
        if args.command == "measure":
            args.json.write_text(json.dumps(measure(args.library, args.only)))
            return 0
        if args.command == "report":
            return report(args.only)
        import perf_planted  # noqa: PLC0415

        return perf_planted.main()
    except emu.BuildError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
