"""Every benchmark names the CPU and its units beside its figures (issue 41); the whole-run
benchmarks read a process's output stamped from its start."""

import glob
import os
import sys

import pytest

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


def test_stamped_output_keeps_order_and_times_from_the_start():
    script = "import sys, time; print('first'); sys.stdout.flush(); time.sleep(0.2); " \
             "print('second', file=sys.stderr)"
    lines = testing.stamped_output([sys.executable, "-c", script])
    assert [line for _, line in lines] == ["first", "second", "exit 0"]
    seconds = [t for t, _ in lines]
    assert 0 < seconds[0] <= seconds[1] <= seconds[2] and seconds[1] >= 0.2  # after the sleep
    with pytest.raises(RuntimeError, match="gone wrong"):
        testing.stamped_output([sys.executable, "-c", "import sys; sys.exit('gone wrong')"])
