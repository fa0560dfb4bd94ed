"""One process per run directory (issue 12): two processes on one config must end with exactly the
metrics of one run (before the lock: 34 -> 24 rows for SET, both exit 0)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["method=set", "dataset=digits", "trainer.epochs=3", "method.delta_t=10", "trainer.progress=false"]


def _run(out, *extra, wait=True):
    env = {**os.environ, "SPARSEBENCH_OUT": str(out)}
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *ARGS, *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    return p.communicate(timeout=300) + (p.returncode,) if wait else p


def _only_run(out):
    (run,) = [p for p in Path(out).iterdir() if (p / "config.yaml").is_file()]
    return run


def test_two_processes_on_one_config_give_the_metrics_of_one_run(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "shared"
    *_, rc = _run(ref_out)
    assert rc == 0
    a, b = _run(out, wait=False), _run(out, wait=False)
    (oa, ea), (ob, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (ea, eb)
    waited = [e for e in (ea, eb) if "is in use by pid" in e]
    finished = [o for o in (oa, ob) if "already finished" in o]
    assert len(finished) == 1 or waited, (oa, ob, ea, eb)  # the second one waited, then reported
    ref = pd.read_csv(_only_run(ref_out) / "metrics.csv")
    got = pd.read_csv(_only_run(out) / "metrics.csv")
    assert len(got) == len(ref) and (got[["step", "name"]] == ref[["step", "name"]]).all().all()
    timing = ref["name"].str.contains("_ms|seconds")  # wall-clock values differ between processes
    pd.testing.assert_frame_equal(got[~timing], ref[~timing])
    assert not got.duplicated(["step", "name"]).any()


def test_lock_timeout_zero_exits_with_one_line_naming_the_holder(tmp_path):
    from sparsebench.core.lock import run_lock

    first = _run(tmp_path, "trainer.epochs=1", wait=True)
    assert first[2] == 0
    run = _only_run(tmp_path)
    with run_lock(run):  # this test process holds the run
        out, err, rc = _run(tmp_path, "trainer.epochs=1", "lock_timeout=0")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run directory") and f"pid {os.getpid()}" in lines[0], lines


def test_result_files_keep_the_users_umask_and_finished_runs_stay_untouched(tmp_path):
    old = os.umask(0o022)
    try:
        out, err, rc = _run(tmp_path, "trainer.epochs=1")
    finally:
        os.umask(old)
    assert rc == 0, err
    run = _only_run(tmp_path)
    for name in ("metrics.csv", "summary.csv", "summary.json", "config.yaml"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()
              and not p.name.startswith(".lock")}
    out, err, rc = _run(tmp_path, "trainer.epochs=1", "trainer.num_threads=1")  # same run id
    assert rc == 0 and "already finished" in out
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()
             and not p.name.startswith(".lock")}
    assert after == before
