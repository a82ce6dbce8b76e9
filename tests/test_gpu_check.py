"""benchmarks/gpu_check.sh: the script a GPU session runs first. Here its parts run on the CPU at
toy shapes (the out-of-memory error simulated), so that the first GPU session gets figures, not
a traceback."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_the_cpu():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for section in ("== detect", "== pack", "== workers", "== oom", "== done"):
        assert section in text, text
    assert "float32: stacked / loop =" in text and "bfloat16: stacked / loop =" in text
    assert "2 worker(s):" in text
    oom = next(line for line in text.splitlines() if line.startswith("packs tried:"))
    assert oom.startswith("packs tried: [8, 4, 2") and "complete 8/8" in oom and "simulated" in oom


def test_gpu_check_script_is_valid_bash_and_refuses_without_cuda():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
    import torch

    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--sections", "detect"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 2 and "no CUDA device" in out.stderr
