"""tools/dev/check_cuda.py (the GPU check of run_gpu_checks.sh) runs and passes on the CPU,
so it has not rotted when a GPU is next lent."""
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_check_cuda_passes_on_the_cpu():
    out = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'dev', 'check_cuda.py'), '--device', 'cpu',
         '--classes', '12', '--k', '3', '--channels', '16', '--size', '16'],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith('| fused') or
            ln.startswith('| eager') or ln.startswith('| streamed')]
    assert len(rows) == 6  # 3 paths x 2 temperatures, float32 only on a CPU
    assert 'all float32 cases within 1e-4 of float64' in out.stdout
