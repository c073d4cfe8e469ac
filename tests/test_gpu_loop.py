"""benchmarks/gpu_loop.py runs where neither Ray nor FFCV is installed (a bare GPU machine), here on the CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = """
import runpy, sys
sys.modules['ray'] = None            # `import ray` / `import ffcv` now raise ImportError, anywhere
sys.modules['ffcv'] = None
sys.argv = ['gpu_loop.py'] + sys.argv[1:]
runpy.run_path(sys.argv[0].replace('gpu_loop.py', %r), run_name='__main__')
""" % str(ROOT / "benchmarks" / "gpu_loop.py")


def test_gpu_loop_runs_tiny_on_the_cpu_without_ray_or_ffcv(tmp_path):
    """Both recipes, base and frozen n = 7, through the store and on the device: one row each, and the two
    paths (the same seeded batches) end at the same top-1."""
    flags = ("--device cpu --side 24 --crop 20 --width 0.0625 --batch 8 --steps 4 --evals 2 "
             "--classes-per-superclass 1 --train-per-class 4 --val-per-class 2").split()
    run = subprocess.run([sys.executable, "-c", BLOCKED, *flags, "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ray/ffcv imported: neither" in run.stdout
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| paper") or
            line.startswith("| fast")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("paper", "base"), ("paper", "frozen n=7"),
                                                           ("fast", "base"), ("fast", "frozen n=7")]
    for r in rows:
        loop, on_device = float(r[5]), float(r[6])
        assert 0 <= loop <= 1 and loop == on_device
        assert float(r[2].replace(",", "")) > 0 and float(r[3].replace(",", "")) > 0
    assert (tmp_path / "store" / "store.json").is_file()


def test_cohort_benchmark_runs_without_ray_or_ffcv_and_both_arms_train_the_same_nets(tmp_path):
    """benchmarks/cohort_step.py: seven frozen members of one base as one cohort and as seven loops, both trunk
    modes; the two arms end with the same weights, bit for bit, on the CPU."""
    script = BLOCKED.replace("gpu_loop.py", "cohort_step.py")
    flags = "--epochs 20,4 --classes-per-superclass 1 --train-per-class 8 --val-per-class 4 --batch 8".split()
    run = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ray/ffcv imported: neither" in run.stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in run.stdout.splitlines() if line.startswith("| demo")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("20", "looked up", "separate"), ("20", "looked up", "cohort"),
                                                  ("4", "once per batch", "separate"), ("4", "once per batch", "cohort")]
    assert all(r[8] == "yes" and float(r[5].replace(",", "")) > 0 for r in rows)
    assert "memory per member (20), MiB: AnB-n1" in run.stdout
