"""Every benchmark names the CPU and its units beside its figures (issue 41)."""

import glob
import os

from reid_tf import testing

AMX_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
AVX2_ONLY = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx avx2 fma\n"


def test_cpu_facts_read_the_model_and_units():
    xeon = testing.cpu_facts(AMX_XEON)
    assert xeon["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert all(xeon["units"].values())
    epyc = testing.cpu_facts(AVX2_ONLY)
    assert epyc["units"] == {"avx2": True, "avx512f": False, "avx512_bf16": False,
                             "avx512_vnni": False, "amx_tile": False, "amx_bf16": False,
                             "amx_int8": False}
    line = testing.cpu_line(epyc)
    assert line.startswith("CPU: AMD EPYC 7B12,") and "has avx2" in line
    assert "lacks avx512f" in line and "amx_int8" in line
    assert set(testing.cpu_facts()["units"]) == set(testing.CPU_UNITS)  # this machine's


def test_every_benchmark_prints_the_cpu_line():
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
    scripts = sorted(glob.glob(os.path.join(folder, "*.py")))
    assert len(scripts) >= 10
    for script in scripts:
        assert "testing.cpu_line()" in open(script).read(), script
