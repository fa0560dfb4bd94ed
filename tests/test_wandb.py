"""W&B by its own conventions (issue 12), checked by reading the offline run's transaction log."""
import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMP = ["method=lth_imp", "method.rounds=2", "trainer.epochs=2", "trainer.progress=false", "logger=wandb"]


def records(path):
    """The records of a ``run-<id>.wandb`` file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks,
    7-byte chunk headers ``crc32 (4) length (2) type (1)``; type 1 = full, 2/3/4 = first/middle/last)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def read_run(base):
    (path,) = glob.glob(str(Path(base) / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, summary, exit_code = [], {}, None
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = (lambda xs: {x.key or "/".join(x.nested_key): json.loads(x.value_json) for x in xs})
        if kind == "history":
            history.append(items(r.history.item))
        elif kind == "summary":
            summary.update(items(r.summary.update))
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return history, summary, exit_code


def _run(tmp_path, *args, mode="offline", extra_env=None):
    env = {**os.environ, "SPARSEBENCH_OUT": str(tmp_path / "runs")}
    env.pop("WANDB_DIR", None)
    env.pop("WANDB_API_KEY", None)
    env.update(extra_env or {})
    if mode is None:
        env.pop("WANDB_MODE", None)
    else:
        env["WANDB_MODE"] = mode
    env["HOME"] = str(tmp_path)  # no ~/.netrc credentials
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env,
                       timeout=300)
    return p


def _run_dir(tmp_path):
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "config.yaml").is_file()]
    return run


def test_offline_imp_history_has_every_round_and_summary(tmp_path):
    p = _run(tmp_path, *IMP)
    assert p.returncode == 0, p.stderr
    run = _run_dir(tmp_path)
    history, summary, code = read_run(run)
    assert code == 0
    steps = [h["_step"] for h in history]
    assert steps == list(range(len(steps)))  # monotonic global step
    metrics = pd.read_csv(run / "metrics.csv")
    for rnd in range(3):  # every round's points arrive, although each round's trainer step restarts
        stored = metrics[metrics["name"] == f"round{rnd}/test_acc"]
        logged = [(h["trainer/step"], h[f"round{rnd}/test_acc"]) for h in history if f"round{rnd}/test_acc" in h]
        assert logged == list(zip(stored["step"], stored["value"])), rnd
        assert all(h["round"] == rnd for h in history if f"round{rnd}/test_acc" in h)
    assert any(k.startswith("round1/density/") for h in history for k in h)  # per-layer density over time
    final = pd.read_csv(run / "summary.csv").iloc[-1]
    assert summary["test_acc"] == pytest.approx(final["test_acc"]) and summary["round"] == 2
    assert summary["density"] == pytest.approx(final["density"])


def test_nan_run_finishes_with_non_zero_exit_code(tmp_path):
    p = _run(tmp_path, "method=dense", "logger=wandb", "trainer.lr=1e6", "trainer.momentum=0.99", "trainer.epochs=3")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: non-finite training loss")
    _history, _summary, code = read_run(_run_dir(tmp_path))
    assert code == 2


def test_wandb_mode_disabled_is_honoured(tmp_path):
    p = _run(tmp_path, "method=dense", "logger=wandb", "logger.mode=offline", "trainer.epochs=1", mode="disabled")
    assert p.returncode == 0, p.stderr
    assert not (_run_dir(tmp_path) / "wandb").exists()


def test_wandb_dir_and_auto_mode_without_credentials(tmp_path):
    wdir = tmp_path / "wb"
    wdir.mkdir()
    p = _run(tmp_path, "method=dense", "logger=wandb", "trainer.epochs=1", mode=None,
             extra_env={"WANDB_DIR": str(wdir)})
    assert p.returncode == 0, p.stderr
    assert glob.glob(str(wdir / "wandb" / "offline-run-*"))  # auto without a key or netrc: offline, in WANDB_DIR
    assert not (_run_dir(tmp_path) / "wandb").exists()


def test_credentials_from_netrc(tmp_path, monkeypatch):
    from sparsebench.core.wandb_sink import has_credentials, resolve_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert has_credentials()

    class L:
        mode = "auto"

    assert resolve_mode(L) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(L) == "offline"


def test_finished_run_uploads_by_relogging(tmp_path):
    assert _run(tmp_path, "method=dense", "trainer.epochs=2").returncode == 0  # csv only
    run = _run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".lock")}
    p = _run(tmp_path, "method=dense", "trainer.epochs=2", "logger=wandb")
    assert p.returncode == 0 and "re-logged" in p.stdout, p.stdout + p.stderr
    history, summary, code = read_run(run)
    stored = pd.read_csv(run / "metrics.csv")
    assert [h["test_acc"] for h in history if "test_acc" in h] == list(stored[stored["name"] == "test_acc"]["value"])
    assert summary["test_acc"] == pytest.approx(pd.read_csv(run / "summary.csv")["test_acc"].iloc[-1])
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".lock")}
    assert after == before  # the finished run's own files are untouched
    p = _run(tmp_path, "method=dense", "trainer.epochs=2", "logger=wandb")
    assert "wandb sync" in p.stdout  # already logged: the documented upload command


def test_unreachable_service_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capfd):
    import wandb

    from sparsebench.api import compose, validate
    from sparsebench.core import wandb_sink

    calls = []
    real_init = wandb.init

    def init(**kw):
        calls.append((kw["mode"], kw["settings"].init_timeout))
        if kw["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 2.0 sec.")
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = validate(compose([f"out_dir={tmp_path}", "method=dense", "logger=wandb", "logger.init_timeout=2"]))
    sink = wandb_sink.open_sink(cfg, "abc123", tmp_path)
    sink(0, {"x": 1.0})
    sink.finish(0)
    assert calls == [("online", 2.0), ("offline", 2.0)]
    err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(err) == 1 and "logger.init_timeout=2" in err[0] and "offline" in err[0], err
