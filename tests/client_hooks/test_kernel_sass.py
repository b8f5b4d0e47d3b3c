"""The partials kernels compiled for an H100 (sm_90) without a GPU (bench/kernel_sass.py):
a full block of finite elements takes the short way, a fraction of the general way's
instructions, with no register spilled. Needs Triton with its NVIDIA backend (ptxas and
nvdisasm come with it); run once, in the plain pass (the interpreter pass compiles nothing)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "nvdisasm")), reason="Triton without its NVIDIA tools"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled once, in the plain pass"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_full_finite_block_runs_under_a_third_of_the_instructions_of_the_whole_block():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TENSORTAP_FUSED_ON_CPU")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_sass.py")], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    finite = int(re.search(r"finite elements \(.*?\): (\d+) \(", out.stdout).group(1))
    whole = int(re.search(r"any full block \(.*?\): (\d+) \(", out.stdout).group(1))
    assert re.search(r"finite elements .*load 8,", out.stdout), out.stdout  # 8 vector loads a thread
    assert 0 < finite * 3 < whole, out.stdout
    spills = [int(s) for s in re.findall(r"stack (\d+) bytes", out.stdout)]
    assert len(spills) == 2 and not any(spills), out.stdout
