"""Progress reporting (issue 12): tqdm bars on a terminal for IMP rounds, LPA stages and table cells,
one line per item otherwise, ``trainer.progress`` honoured; numbers never change."""
import io
import os
import signal
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from sparsebench.api import compose, execute

IMP = ["method=lth_imp", "method.rounds=2", "dataset=iris", "trainer.epochs=2"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def tty(monkeypatch):
    """A stand-in terminal as stderr (installed inside the test: pytest resets sys.stderr after set-up)."""
    def install():
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        return term
    return install


def test_imp_rounds_bar_on_a_terminal(tmp_path, capsys, tty):
    tty = tty()
    df = execute(compose([f"out_dir={tmp_path}", *IMP]), quiet=True)  # trainer.progress=null: on (a terminal)
    out = capsys.readouterr().out
    assert "IMP rounds" in tty.getvalue() and "3/3" in tty.getvalue()
    assert "round  0" not in out  # the per-round line became the bar's postfix
    assert len(df) == 3


def test_imp_rounds_one_line_each_without_a_bar(tmp_path, capsys):
    execute(compose([f"out_dir={tmp_path}", *IMP, "trainer.progress=false"]), quiet=True)
    cap = capsys.readouterr()
    assert [ln.split()[:2] for ln in cap.out.splitlines() if ln.startswith("  round")] == \
        [["round", "0"], ["round", "1"], ["round", "2"]]
    assert "IMP rounds" not in cap.err


def _lpa(progress):
    from sparsebench.graph.estimator import LabelSpreading

    rng = np.random.default_rng(0)
    x = rng.random((60, 5), dtype=np.float32)
    y = np.where(np.arange(60) % 3 == 0, np.arange(60) % 2, -1)
    return LabelSpreading(n_neighbors=5, graph="brute", pca_components=3, progress=progress).fit(x, y)


def test_lpa_stages(capsys, tty):
    tty = tty()
    quiet = _lpa(False)
    assert capsys.readouterr().out == "" and tty.getvalue() == ""
    _lpa(None)  # a terminal: a bar over the three stages
    assert "LPA" in tty.getvalue() and "3/3" in tty.getvalue() and capsys.readouterr().out == ""
    sys.stderr = io.StringIO()  # not a terminal: one line per stage (monkeypatch restores stderr)
    lines = _lpa(True)
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in out] == ["pca", "graph", "propagation"], out
    np.testing.assert_array_equal(lines.transduction_, quiet.transduction_)


def _fake_table(monkeypatch, n_cells, on_cell=lambda n: None):
    import sparsebench.api as api
    from sparsebench.tables import runner

    cells = [SimpleNamespace(index=i, label=f"c{i}") for i in range(n_cells)]
    monkeypatch.setattr(runner, "mode_cells", lambda spec, mode: cells)
    monkeypatch.setattr(runner, "cell_seeds", lambda spec, c, mode, requested=None: [0])
    monkeypatch.setattr(runner, "cell_overrides", lambda spec, c, mode, seed: [f"cell={c.index}"])
    calls = []

    def fake_execute(cfg, quiet=False):
        calls.append(cfg)
        on_cell(len(calls))
        return pd.DataFrame([{"acc": 1.0}])

    monkeypatch.setattr(api, "compose", lambda ov: ov)
    monkeypatch.setattr(api, "execute", fake_execute)
    return runner, calls


def test_table_cells_bar_on_a_terminal_lines_otherwise(monkeypatch, tty):
    tty = tty()
    runner, _ = _fake_table(monkeypatch, 3)
    said = []
    runs, failed = runner.run_cells({"id": "TX"}, say=said.append)
    assert len(runs) == 3 and not failed and said == [] and "3/3" in tty.getvalue()
    runs, _ = runner.run_cells({"id": "TX"}, extra=["trainer.progress=false"], say=said.append)
    assert said == [f"[TX] cell {n}/3: c{n - 1} (seed 0)" for n in (1, 2, 3)]


def test_table_stops_before_the_next_cell_on_sigterm(monkeypatch):
    from sparsebench.training.runtime import Preempted

    runner, calls = _fake_table(monkeypatch, 3, on_cell=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted, match=r"^SIGTERM after cell 1/3 of TX"):
        runner.run_cells({"id": "TX"}, say=lambda line: None)
    assert len(calls) == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
