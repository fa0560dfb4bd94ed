"""Paper tables: every spec loads and composes (no training), the table schema, spec validation, and a toy
table end to end (the recipe of results/README.md: a spec with two tiny cells and a few-line builder)."""
import sys
import textwrap

import pandas as pd
import pytest

from sparsebench.core.errors import ConfigError, SparsebenchError
from sparsebench.tables.runner import build_table, run_cells
from sparsebench.tables.schema import TABLE_COLUMNS, check_table, rows
from sparsebench.tables.spec import (MODES, cell_overrides, cell_seeds, expand, load_spec, mode_cells, read_spec,
                                     table_ids, validate_spec)

IDS = table_ids()


def test_every_table_has_a_spec():
    assert len(IDS) >= 20 and "T003-imp" in IDS


_COMPOSED = {}  # signature -> error line or None, shared by the parametrized cases (compose is ~0.1-0.3 s)


def _signature(ov):
    """Group choices and override keys (values dropped): cells that differ only in values compose alike."""
    return tuple(o if o.split("=", 1)[0] in ("+experiment", "model", "dataset", "method", "trainer", "logger")
                 else o.split("=", 1)[0] for o in ov)


@pytest.mark.parametrize("table_id", IDS)
def test_spec_composes_in_every_mode(table_id):
    """Compose (no training) every cell of the spec in every mode it has (cells that differ only in
    override values are composed once)."""
    from sparsebench.api import compose

    spec = load_spec(table_id)
    errors = []
    for mode in MODES:
        if mode == "full" and not spec.get("full"):
            continue
        for cell in mode_cells(spec, mode):
            ov = cell_overrides(spec, cell, mode, cell_seeds(spec, cell, mode)[0])
            sig = _signature(ov)
            if sig not in _COMPOSED:
                try:
                    assert compose(ov).table == table_id
                    _COMPOSED[sig] = None
                except ConfigError as err:
                    _COMPOSED[sig] = str(err)
            if _COMPOSED[sig]:
                errors.append(f"[{mode}] {cell.label}: {_COMPOSED[sig]}")
    assert not errors, "\n".join(errors)


def test_quick_preset_wins_over_a_row_delta():
    """T003-imp's rows set method.rounds; its quick preset's rounds=2 must win, as the old `quick:` list did."""
    from sparsebench.api import compose

    spec = load_spec("T003-imp")
    cells = mode_cells(spec, "quick")
    assert [c.label for c in cells] == ["frankle 20%/10% per round", "algorithm-1 p^(1/n), n=10",
                                        "frankle 20%/10% per round, 50k iterations"]
    for cell in cells:
        cfg = compose(cell_overrides(spec, cell, "quick", 0))
        assert (cfg.method.rounds, cfg.trainer.iterations, cfg.model.name) == (2, 30, "lenet300_100")
    cfg = compose(cell_overrides(spec, cells[0], "setting", 0))
    assert (cfg.method.rounds, cfg.trainer.iterations, cfg.trainer.early_stop_every_steps) == (18, 10000, 100)
    assert compose(cell_overrides(spec, cells[2], "setting", 0)).trainer.iterations == 50000
    full = mode_cells(spec, "full")
    assert [c.label for c in full] == ["frankle 20%/10% per round"]
    assert compose(cell_overrides(spec, full[0], "full", 0)).trainer.iterations == 50000


def test_row_seeds_restrict_the_spec_seeds():
    """A row's own ``seeds`` (T003-imp's 50k-iteration row runs one seed) replace the spec's; --seeds is
    intersected with them; quick mode ignores them."""
    spec = _spec(seeds=[0, 1, 2], rows=[{"label": "a", "overrides": []}, {"label": "b", "overrides": [], "seeds": [0]}])
    validate_spec(spec)
    a, b = expand(spec)
    assert cell_seeds(spec, a, "setting") == [0, 1, 2] and cell_seeds(spec, b, "setting") == [0]
    assert cell_seeds(spec, a, "setting", [1, 2]) == [1, 2] and cell_seeds(spec, b, "setting", [1, 2]) == []
    assert cell_seeds(spec, b, "quick") == [0, 1, 2]


def test_sweep_expands_to_labelled_cells_with_reported_values():
    spec = load_spec("T001-3.4")
    cells = {c.label: c for c in expand(spec)}
    assert cells["faiss LSH bits=1.5"].params["method.bits"] == 1.5
    assert cells["faiss LSH bits=1.5"].reported == {"acc": 72.0, "hours": 2.68}
    assert "method.update_layers=[*conv*.weight,*shortcut.weight]" in \
        {c.label: c for c in mode_cells(spec, "full")}["faiss LSH bits=8"].overrides


def _spec(**kw):
    base = {"id": "T-toy", "dataset_used": "iris", "scale": "tiny", "builder": "toy_builder:build", "seeds": [0],
            "rows": [{"label": "lr={trainer.lr}", "overrides": ["method=dense"], "sweep": {"trainer.lr": [0.1, 0.05]},
                      "reported": {"lr=0.1": {"test_acc": 0.9}}}]}
    base.update(kw)
    return base


def test_spec_validation_errors():
    validate_spec(_spec())
    with pytest.raises(ConfigError, match="not labels"):
        validate_spec(_spec(rows=[{**_spec()["rows"][0], "reported": {"lr=0.3": {"test_acc": 1}}}]))
    with pytest.raises(ConfigError, match="duplicate cell label"):
        validate_spec(_spec(rows=[{"label": "a", "overrides": []}, {"label": "a", "overrides": []}]))
    with pytest.raises(ConfigError, match="names none of"):
        validate_spec(_spec(rows=[{"label": "k={method.k}", "sweep": {"trainer.lr": [0.1]}}]))
    with pytest.raises(ConfigError, match="old spec format"):
        validate_spec(_spec(runs=[["method=dense"]]))
    with pytest.raises(ConfigError, match="missing key 'scale'"):
        validate_spec({k: v for k, v in _spec().items() if k != "scale"})
    with pytest.raises(ConfigError, match="no .*nope.yaml"):
        validate_spec(_spec(setting="nope"))


def test_schema_of_a_built_table():
    spec = {"id": "T-x", "dataset_used": "digits", "scale": "tiny"}
    df = pd.DataFrame([rows(spec, "a", "acc", [0.5, 0.7], 0.6, extra_col=1)])
    out = check_table(df, "T-x")
    assert list(out.columns[:len(TABLE_COLUMNS)]) == TABLE_COLUMNS and out["measured"][0] == pytest.approx(0.6)
    assert out["n_seeds"][0] == 2 and out["measured_std"][0] == pytest.approx(0.1414, abs=1e-3)
    with pytest.raises(ValueError, match="missing columns"):
        check_table(df.drop(columns=["reported"]), "T-x")
    with pytest.raises(ValueError, match="no rows"):
        check_table(df.iloc[:0], "T-x")


TOY_BUILDER = '''
from sparsebench.tables.schema import rows
import pandas as pd

def build(spec, runs):
    return pd.DataFrame([rows(spec, c.label, "test_acc", runs[runs["cell"] == c.index]["test_acc"].tolist(),
                              c.reported.get("test_acc", "")) for c in spec["cells"]])
'''


def test_toy_table_end_to_end(tmp_path, monkeypatch):
    """The recipe for a new table: a spec (rows + sweep + reported) and a builder of a few lines."""
    (tmp_path / "toy_builder.py").write_text(TOY_BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "T-toy.yaml").write_text(textwrap.dedent("""\
        id: T-toy
        dataset_used: iris
        scale: "iris, MLP, 1 epoch"
        seeds: [0]
        rows:
          - label: "dense lr={trainer.lr}"
            overrides: [dataset=iris, method=dense, trainer.epochs=1]
            sweep: {trainer.lr: [0.1, 0.05]}
            reported: {"dense lr=0.1": {test_acc: 0.9}}
        builder: toy_builder:build
        """))
    lines, extra = [], [f"out_dir={tmp_path / 'runs'}"]
    with pytest.raises(SparsebenchError, match="not finished"):  # --finished-only trains nothing
        build_table(read_spec(tmp_path / "T-toy.yaml"), out_dir=tmp_path, extra=extra, say=lines.append,
                    finished_only=True)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/summary.csv"))
    lines.clear()
    path = build_table(read_spec(tmp_path / "T-toy.yaml"), out_dir=tmp_path, extra=extra, say=lines.append)
    df = pd.read_csv(path)
    again = pd.read_csv(build_table(read_spec(tmp_path / "T-toy.yaml"), out_dir=tmp_path / "again", extra=extra,
                                    say=lambda _: None, finished_only=True))
    assert again["measured"].tolist() == df["measured"].tolist()
    assert list(df["setting"]) == ["dense lr=0.1", "dense lr=0.05"]
    assert df["reported"].iloc[0] == 0.9 and df["reported"].isna().iloc[1]
    assert df["measured"].between(0, 1).all() and (df["n_seeds"] == 1).all()
    assert lines[:2] == ["[T-toy] cell 1/2: dense lr=0.1 (seed 0)", "[T-toy] cell 2/2: dense lr=0.05 (seed 0)"]
    sys.modules.pop("toy_builder", None)


def test_failed_cells_are_listed_not_fatal(tmp_path):
    spec = validate_spec(_spec(rows=[{"label": "ok", "overrides": ["dataset=digits", "method=dense", "trainer.epochs=1"]},
                                     {"label": "bad", "overrides": ["method=magnitude", "method.density=3"]}]))
    runs, failed = run_cells(spec, extra=[f"out_dir={tmp_path}"], say=lambda _: None)
    assert list(runs["label"].unique()) == ["ok"] and len(failed) == 1 and "method.density=3.0" in failed[0]


# --------------------------------------------------------------------------- verdicts from seed spread
def test_compare_holds_only_outside_the_noise():
    from sparsebench.tables.schema import combine, compare

    clear = compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.79])
    assert clear["verdict"] == "holds" and clear["test"] == "welch t" and clear["ci_low"] > 0 and clear["p"] < 0.01
    assert abs(clear["diff"] - 0.11) < 1e-9
    # a mean difference inside the seed spread is not a "holds"
    noisy = compare([0.90, 0.80, 0.95], [0.85, 0.88, 0.84])
    assert noisy["diff"] > 0 and noisy["verdict"] == "not resolved" and noisy["ci_low"] < 0 < noisy["ci_high"]
    assert compare([0.80, 0.81, 0.79], [0.90, 0.91, 0.92])["verdict"] == "reversed"
    # one seed on a side: never decided, whatever the means
    assert compare([0.99], [0.10, 0.11])["verdict"] == "not resolved (n=1)"
    assert compare([0.99, 0.98], [0.10])["verdict"] == "not resolved (n=1)"
    # identical per-seed differences: no spread, no test
    assert compare([0.5, 0.6], [0.4, 0.5], paired=True)["verdict"] == "not resolved (no spread)"
    # against a fixed threshold, every seed on one side decides it (e.g. 0 dead units < 10% in all seeds)
    assert compare([0.0, 0.0, 0.0], 0.1)["verdict"] == "reversed (all seeds equal)"
    assert compare([0.2, 0.2, 0.2], 0.1)["verdict"] == "holds (all seeds equal)"
    assert compare([0.1, 0.1], 0.1)["verdict"] == "not resolved (no spread)"
    # the Welch interval matches scipy's t-test (same p-value)
    from scipy import stats

    a, b = [0.90, 0.80, 0.95, 0.91], [0.85, 0.88, 0.84]
    assert abs(compare(a, b)["p"] - stats.ttest_ind(a, b, equal_var=False).pvalue) < 1e-9


def test_compare_paired_margin_threshold_and_combine():
    from sparsebench.tables.schema import combine, compare

    # paired: a constant per-seed offset is resolved even when the seeds spread widely
    a, b = [0.70, 0.80, 0.90], [0.69, 0.785, 0.89]
    assert compare(a, b)["verdict"] == "not resolved"
    p = compare(a, b, paired=True)
    assert p["test"] == "paired t" and p["verdict"] == "holds"
    with pytest.raises(ValueError, match="paired"):
        compare([1, 2, 3], [1, 2], paired=True)
    # margin: "within one point of dense" holds for a ticket 0.2 points below, not for 3 points below
    dense = [0.980, 0.982, 0.981]
    assert compare([0.978, 0.981, 0.979], dense, paired=True, margin=0.01)["verdict"] == "holds"
    assert compare([0.950, 0.953, 0.951], dense, paired=True, margin=0.01)["verdict"] == "reversed"
    # scalar b: one-sample t against a threshold
    t = compare([0.10, 0.11, 0.09], 0.02)
    assert t["test"] == "one-sample t" and t["verdict"] == "holds"
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "reversed", "not resolved"]) == "reversed"
    assert combine(["holds", "not resolved (n=1)"]) == "not resolved (n=1)"


def test_orderings_table_decides_each_claim_from_paired_seeds():
    """T001-orderings-*: a > b by a clear margin holds, a reversed gap is reversed, equal within the margin
    is equivalent, and a missing label is an error naming it."""
    from types import SimpleNamespace

    from sparsebench.tables.builders.t001 import orderings_table

    cells = [SimpleNamespace(index=i, label=lab, reported={}) for i, lab in enumerate(["hi", "lo", "lo2"])]
    acc = {"hi": [0.90, 0.91, 0.92], "lo": [0.80, 0.82, 0.81], "lo2": [0.801, 0.819, 0.812]}
    runs = pd.DataFrame([{"cell": i, "seed": s, "test_acc": acc[c.label][s], "train_seconds": 1.0 + s}
                         for i, c in enumerate(cells) for s in range(3)])
    spec = {"id": "T-ord", "dataset_used": "toy", "scale": "tiny", "cells": cells, "orderings": [
        {"claim": "hi > lo", "a": "hi", "b": "lo"}, {"claim": "lo > hi", "a": "lo", "b": "hi"},
        {"claim": "lo ~ lo2", "a": "lo", "b": "lo2", "kind": "equivalent", "margin": 1.0},
        {"claim": "hi ~ lo", "a": "hi", "b": "lo", "kind": "equivalent", "margin": 1.0}]}
    df = orderings_table(spec, runs).set_index("setting")
    assert df.loc["hi > lo", "ordering_holds"] == "holds"
    assert df.loc["hi > lo", "measured"] == pytest.approx(10.0)  # points
    assert df.loc["lo > hi", "ordering_holds"] == "reversed"
    assert df.loc["lo ~ lo2", "ordering_holds"] == "holds"
    assert df.loc["hi ~ lo", "ordering_holds"] == "reversed"
    with pytest.raises(ValueError, match="nope"):
        orderings_table({**spec, "orderings": [{"claim": "x", "a": "nope", "b": "hi"}]}, runs)


def test_lpa_speedup_row_tests_the_documents_factor():
    """T000-lpa-mnist: a subset-timed cell's graph time is extrapolated quadratically to the reference cell's
    n and divided by its graph time per seed; with `speedup_claim` the row says whether the speed-ups lie
    above the document's factor by a one-sample t (below it: reversed), naming the test."""
    from sparsebench.tables.builders.t000 import lpa_table
    from sparsebench.tables.spec import Cell

    spec = {"id": "T", "dataset_used": "d", "scale": "s", "document_setting": "yes",
            "metrics": ["graph_seconds"],
            "cells": [Cell(0, "ref", [], {}, {}, {}), Cell(1, "naive", [], {}, {"graph_speedup": "> 166"},
                                                           {"extrapolate_to": "ref", "speedup_claim": 166})]}
    runs = pd.DataFrame([
        {"cell": 0, "label": "ref", "seed": s, "n": 1000, "graph_seconds": g, "backend": "a", "dataset": "d"}
        for s, g in ((0, 1.0), (1, 1.1), (2, 0.9))] + [
        {"cell": 1, "label": "naive", "seed": s, "n": 200, "graph_seconds": g, "backend": "b", "dataset": "d"}
        for s, g in ((0, 4.0), (1, 4.2), (2, 3.9))])
    table = lpa_table(spec, runs)
    row = table[table.metric == "graph_speedup"].iloc[0]
    want = [4.0 * 25 / 1.0, 4.2 * 25 / 1.1, 3.9 * 25 / 0.9]
    assert row.measured == pytest.approx(sum(want) / 3) and row.n_seeds == 3
    assert row.claim_holds == "reversed" and "one-sample t" in row.test and "against 1x" in row.test
    spec["cells"][1].row["speedup_claim"] = 50
    assert lpa_table(spec, runs).query("metric == 'graph_speedup'").iloc[0].claim_holds == "holds"
