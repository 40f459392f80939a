"""The kernels compile for an H100 (sm_90) with Triton's own ptxas, even on a machine without a
GPU: catches what the CPU interpreter accepts but the GPU compiler rejects."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
HERE = Path(__file__).parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build has no bundled ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "compile_sm90.py"), "100", "4096"], env=env,
                          cwd=HERE.parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("N=")]
    assert len(lines) == 2 * 2 * 3, proc.stdout  # 2 sizes x (rms, ln) x 3 warp counts, fwd and bwd each
