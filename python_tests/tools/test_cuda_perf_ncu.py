"""tools/ncu_perf.py (make gpu-check's profiler part) without a GPU: its reading of Nsight Compute's --csv output, on a
hand-written sample in ncu's long form, its join with the emulator's rows, and its skip when ncu is absent."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import ncu_perf  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _rows(launch_id: int, kernel: str, values: dict[str, tuple[str, str]]) -> list[str]:
    return [f'"{launch_id}","4242","python3.11","gpu-1","{kernel}","1","7","(256, 1, 1)","(1, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","{unit}","{value}"' for metric, (unit, value) in values.items()]


def _metrics(ld_sectors, ld_requests, st_sectors, st_requests, conflicts=("0", "0"), wavefronts=("0", "0"),
             dram=("0", "0"), ns="1,000"):
    return {ncu_perf.LD_SECTORS: ("sector", ld_sectors), ncu_perf.LD_REQUESTS: ("request", ld_requests),
            ncu_perf.ST_SECTORS: ("sector", st_sectors), ncu_perf.ST_REQUESTS: ("request", st_requests),
            ncu_perf.SMEM_CONFLICTS[0]: ("", conflicts[0]), ncu_perf.SMEM_CONFLICTS[1]: ("", conflicts[1]),
            ncu_perf.SMEM_WAVEFRONTS[0]: ("", wavefronts[0]), ncu_perf.SMEM_WAVEFRONTS[1]: ("", wavefronts[1]),
            ncu_perf.DRAM[0]: ("byte", dram[0]), ncu_perf.DRAM[1]: ("byte", dram[1]), ncu_perf.DURATION: ("nsecond", ns)}


# What `ncu --csv --print-units base --metrics ...` prints for one gather_tokens_backward call: its own ==PROF== lines
# and the program's output first, then one row per launch and metric; torch's index check (a reduce kernel) is
# profiled too; the scatter kernel's name in demangled form (what --print-kernel-base demangled gives).
SAMPLE = "\n".join([
    "==PROF== Connected to process 4242 (/usr/bin/python3.11)",
    '==PROF== Profiling "reduce_kernel" - 0: 0%....50%....100% - 9 passes',
    '==PROF== Profiling "build_inverse_kernel" - 1: 0%....50%....100% - 9 passes',
    '==PROF== Profiling "scatter_rows_kernel" - 2: 0%....50%....100% - 9 passes',
    "some line the program printed",
    "==PROF== Disconnected from process 4242",
    HEADER,
    *_rows(0, "reduce_kernel", _metrics("100", "10", "1", "1")),
    *_rows(1, "build_inverse_kernel", _metrics("236", "94", "104", "26", conflicts=("3", "1"),
                                               wavefronts=("40", "12"), dram=("1,536", "7,680"), ns="3,264")),
    *_rows(2, "void epic_ext::(anonymous namespace)::scatter_rows_kernel<__nv_bfloat16, true>(const T1 *, "
              "const int *, const int *, epic_ext::(anonymous namespace)::RowShape, long, T1 *)",
           _metrics("1,048,576", "65,536", "163,840", "10,240", dram=("1,572,864", "5,242,880"), ns="2,150.5")),
])

CALL = "gather_tokens_backward LLaVA-1.5-7B hidden [1, 640, 4096] bf16 -> 192 rows"
EMU_ROWS = [
    {"op": "gather_tokens_backward", "model": "LLaVA-1.5-7B", "shape": "hidden [1, 640, 4096] bf16 -> 192 rows",
     "kernel": "build_inverse_kernel", "load_sectors_per_request": "2.51", "store_sectors_per_request": "4.0",
     "bank_ways_mean": "", "moved_bytes": "7264000", "h100_model_us": "2.17"},
    {"op": "gather_tokens_backward", "model": "LLaVA-1.5-7B", "shape": "hidden [1, 640, 4096] bf16 -> 192 rows",
     "kernel": "kernel@gather_tokens.cu:314", "load_sectors_per_request": "3.81",
     "store_sectors_per_request": "16.0", "bank_ways_mean": "", "moved_bytes": "7264000", "h100_model_us": "2.17"},
    {"op": "select_tokens", "model": "LLaVA-1.5-7B", "shape": "scores", "kernel": "kernel@select_tokens.cu:257",
     "load_sectors_per_request": "4.0", "store_sectors_per_request": "4.0", "bank_ways_mean": "1.0",
     "moved_bytes": "10000", "h100_model_us": "0.01"},
]


def test_parses_ncu_long_csv_with_noise_and_thousands_separators():
    launches = ncu_perf.parse_ncu_csv(SAMPLE)
    assert [l["id"] for l in launches] == [0, 1, 2]
    inverse = launches[1]["metrics"]
    assert inverse[ncu_perf.LD_SECTORS] == 236 and inverse[ncu_perf.LD_REQUESTS] == 94
    assert inverse[ncu_perf.DRAM[1]] == 7680
    assert inverse[ncu_perf.DURATION] == pytest.approx(3.264e-6)
    assert launches[2]["metrics"][ncu_perf.LD_SECTORS] == 1_048_576


def test_only_our_kernels_are_kept_whatever_the_name_form():
    kernels = ncu_perf.per_kernel(ncu_perf.parse_ncu_csv(SAMPLE), ncu_perf.our_kernels())
    assert sorted(kernels) == ["build_inverse_kernel", "scatter_rows_kernel"]
    assert kernels["scatter_rows_kernel"]["launches"] == 1


def test_join_puts_ncu_figures_beside_the_emulator_rows():
    known = ncu_perf.our_kernels()
    measured = {CALL: ncu_perf.per_kernel(ncu_perf.parse_ncu_csv(SAMPLE), known)}
    rows = ncu_perf.join(EMU_ROWS, measured, known)
    inverse, scatter, select = rows
    assert inverse["ncu_kernels"] == "build_inverse_kernel"
    assert inverse["ncu_ld_sectors_per_request"] == pytest.approx(236 / 94)
    assert inverse["ncu_st_sectors_per_request"] == pytest.approx(4.0)
    # ways = wavefronts / (wavefronts - conflicts): 52 / 48
    assert inverse["ncu_bank_ways"] == pytest.approx(52 / 48)
    assert inverse["ncu_dram_bytes"] == 1536 + 7680
    # The emulator names the scatter kernel by its launch site: the file's kernel that no other row names.
    assert scatter["ncu_kernels"] == "scatter_rows_kernel"
    assert scatter["ncu_ld_sectors_per_request"] == pytest.approx(16.0)
    assert scatter["ncu_bank_ways"] is None  # no shared accesses
    assert scatter["ncu_us"] == pytest.approx(2.1505)
    assert "ncu_kernels" not in select  # not profiled: the emulator's row stays as it was
    text = ncu_perf.render(rows[:2], "NVIDIA H100 80GB HBM3", "header")
    assert "| build_inverse_kernel | 2.51 / 2.51 | 4.00 / 4.00 | - / 1.08 | 4 / 52 |" in text


def test_unknown_units_and_missing_header_are_refused():
    with pytest.raises(ValueError, match="unit"):
        ncu_perf.parse_ncu_csv(SAMPLE.replace('"nsecond"', '"usecond2"'))
    with pytest.raises(ValueError, match="header"):
        ncu_perf.parse_ncu_csv("==PROF== No kernels were profiled.\n")


def test_report_skips_with_a_message_without_ncu(monkeypatch, capsys):
    monkeypatch.setattr(ncu_perf, "find_ncu", lambda: None)
    assert ncu_perf.report(None, None, require=False) == 0
    assert "skipped: Nsight Compute's `ncu` is not on PATH" in capsys.readouterr().out
    assert ncu_perf.report(None, None, require=True) == 1
