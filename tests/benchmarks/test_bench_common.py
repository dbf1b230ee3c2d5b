"""benchmarks/bench_common.py: the machine a benchmark's figures came from, CPU included."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_common import cpu, machine  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma bmi2

processor\t: 1
model name\t: another core's line is not read
flags\t\t: avx512f
"""


def test_cpu_names_the_model_its_vector_extensions_and_the_boot(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "boot_id").write_text("0f3c\n")
    assert cpu(tmp_path / "cpuinfo", tmp_path / "boot_id") == {
        "model": "AMD EPYC", "family": "25", "model_id": "1", "vector_isa": ["avx2"], "boot_id": "0f3c"}


def test_cpu_without_proc_files_still_answers(tmp_path):
    """No /proc/cpuinfo (not Linux): the platform's processor name; no boot id: None."""
    assert set(cpu(tmp_path / "none", tmp_path / "none")) == {"model"}
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    assert cpu(tmp_path / "cpuinfo", tmp_path / "none")["boot_id"] is None


def test_machine_carries_the_cpu():
    assert machine()["cpu"] == cpu()
