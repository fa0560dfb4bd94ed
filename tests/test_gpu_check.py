"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU check runs on the CPU at toy sizes, in
under two minutes, into a temporary directory (never results/), so the script cannot rot between the
rare GPU sessions."""
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["fullscale", "train --channels-last", "lpa", "dst", "sparse_train", "sparse_fwd", "cuda_tests"]


def _bench_files():
    return {p: p.stat().st_mtime_ns for p in (ROOT / "results" / "bench").glob("gpu_*.txt")}


def test_gpu_check_dry_run(tmp_path):
    before = _bench_files()
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "SPARSEBENCH_CACHE": str(tmp_path / "cache")}
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=400)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    took, cpu = time.time() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    summary = (tmp_path / "out" / "gpu_summary.txt").read_text()
    assert p.returncode == 0, summary + p.stderr[-2000:]
    for step in STEPS:
        (line,) = [ln for ln in summary.splitlines() if ln.startswith(step + " ")]
        assert " ok" in line, line
    for name in ("fullscale", "train", "lpa", "dst", "sparse_train", "sparse_forward", "tests"):
        assert (tmp_path / "out" / f"gpu_{name}.txt").stat().st_size > 0
    assert "images/s" in (tmp_path / "out" / "gpu_train.txt").read_text()
    assert "ours" in (tmp_path / "out" / "gpu_sparse_train.txt").read_text()
    assert "SYNTHETIC" in summary  # the dry run never uses the real sets, and says so
    assert _bench_files() == before  # nothing written to results/bench
    # under 2 minutes on 2 cores: judged on the CPU seconds the dry run used (about 65 s), since the wall
    # time of a shared machine depends on the other jobs (load average in the summary's second line)
    assert cpu < 120, f"dry run used {cpu:.0f} CPU s ({took:.0f} s wall); budget: under 2 minutes"


def test_gpu_check_rejects_unknown_arguments():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
