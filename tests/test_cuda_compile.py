"""The CUDA sources compile for sm_90a without torch (CI has nvcc but no GPU). That the
generated instruction layout header is up to date is tests/test_instructions.py's check."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC_FLAGS = ["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", f"-I{CSRC}", "-c"]


def test_no_torch_headers_in_cuda_sources():
    for path in sorted(CSRC.rglob("*.cu")) + sorted(CSRC.rglob("*.cuh")):
        text = path.read_text()
        assert "torch/" not in text and "ATen/" not in text, f"{path} includes torch headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm90a(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu files in csrc/"
    jobs = [["nvcc", *NVCC_FLAGS, str(src), "-o", str(tmp_path / (src.stem + ".o"))]
            for src in sources]
    # The profiling build must compile too (it is off by default).
    jobs += [["nvcc", *NVCC_FLAGS, "-DMEGAKERNEL_PROFILE=1", str(src), "-o",
              str(tmp_path / (src.stem + ".profile.o"))] for src in sources]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True),
                                jobs))
    for cmd, r in zip(jobs, results):
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}"
