#!/usr/bin/env python
"""Write results/README.md: the spec format and presets, then every table ID with its presets, make
targets, CSV and what was actually run."""
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FORMAT = """## Spec format (`experiments/<ID>.yaml`)

Settings every row of a table shares live in Hydra presets `src/sparsebench/conf/experiment/<DOC>/<name>.yaml`
(`# @package _global_`: `defaults: [override /model: ..., ...]` plus values). A spec names them and lists
its rows as deltas; cells are keyed by label, never by position:

```yaml
id: T001-3.4
document: 001_8a77eefa87ff613d.txt
what: "Table 3.4: LSH index grow, dT=1, 80%"
dataset_used: mnist
scale: "honest note on the reduced scale"  # the CSV's scale column appends the preset's overrides
document_setting: "reduced: MNIST stand-in for CIFAR-100, 3 of 70 epochs"  # "yes" or "reduced: how" (CSV column)
seeds: [0, 1]
setting: T001/reduced        # make table-<ID>: +experiment=T001/reduced before each cell
quick: T001/quick            # QUICK=1 / --quick: its values are applied AFTER each cell (they win over deltas)
full: {preset: T001/full}    # make table-full-<ID> / --full; optional `cells: [labels]` runs a subset
quick_seeds: [0]             # optional, also per row
builder: sparsebench.tables.builders.t001:thesis_table
rows:
  - label: "pruned 80% (fixed mask)"
    role: fixed                                    # builder-specific keys stay on the row
    overrides: [method=static_sparse, method.density=0.2, method.distribution=uniform]
    reported: {acc: 69.94, hours: 0.61}            # only the five documents' numbers, {metric: value}
    # reference: "Evci et al. 2020: ..."           # another paper's claim (CSV column reference, with the citation)
  - label: "faiss LSH bits={method.bits}"          # {key} is filled from the sweep point
    overrides: [method=faiss_grow, method.density=0.2, method.distribution=uniform, method.drop_fraction=0.05]
    sweep: {method.bits: [0.5, 1]}                 # optional grid: cartesian product, first key outermost
    full: ["method.update_layers=[*conv*.weight,*shortcut.weight]"]   # appended in the full setting (false: skip)
    seeds: [0]                                     # optional: this row's own seeds (e.g. one much longer run)
    reported:                                      # a sweep row keys reported by cell label
      "faiss LSH bits=0.5": {acc: 72.46, hours: 2.41}
      "faiss LSH bits=1": {acc: 72.8, hours: 2.49}
```

A cell runs as `+experiment=<setting> <overrides> <sweep point> seed=<s> table=<ID> [quick values] [extra]`
(`python run.py +experiment=T001/reduced method=rigl` runs one by hand). A table runs every cell it needs
itself: cells shared with another table (T002-unit and T002-weight, T004-prune and T004-train, T001-3.3's dT=1
references and T001-3.1) are the same config, so the finished
run is reused through the config hash (`table` is not hashed). `make table-<ID>` prints one line per cell
and seed (`[ID] cell i/n: label (seed s)`).

**Adding a table**: write `experiments/<ID>.yaml` (rows + presets, as above) and a builder
`builder(spec, runs) -> DataFrame` in `src/sparsebench/tables/builders/t00<doc>.py`: `runs` holds the run
summaries with `cell` and `label` columns; `spec["cells"]` the cells (`label`, `params` = the cell's
overrides as `{key: value}`, `reported`, `row`); return rows made by `sparsebench.tables.schema.rows(spec,
setting, metric, values_over_seeds, reported, **extra)`. `tests/test_tables.py::test_toy_table_end_to_end`
does this with a 5-line builder on Iris; `tests/test_tables.py` also composes every cell of every spec.
"""


def main() -> int:
    import yaml

    from sparsebench.core.io import atomic_write_text

    lines = ["# Results", "",
             "One CSV per table/figure ID of `../shared/papers/TABLES.md` (long format: `id, setting, metric, "
             "measured, measured_std, reported, dataset_used, scale, n_seeds` + table-specific columns). "
             "Regenerate one with `make table-<ID>` (the document setting of the spec), `make table-<ID> QUICK=1` "
             "(smoke test; its CSV and figures go to the temporary directory, `OUT=dir` to choose), "
             "`make table-full-<ID>` (the document's full setting, into `results/full/`), all with `make tables`. "
             "Benchmarks print their ratios into `results/bench/`.", "", FORMAT,
             "## Tables", "",
             "| ID | what | dataset used here | presets (setting / quick / full) | scale here | "
             "document setting? yes / reduced: how | CSV | figure |",
             "|---|---|---|---|---|---|---|---|"]
    for spec_path in sorted((ROOT / "experiments").glob("T*.yaml")):
        spec = yaml.safe_load(spec_path.read_text())
        tid = spec["id"]
        csv = ROOT / "results" / f"{tid}.csv"
        png = sorted((ROOT / "results").glob(f"{tid}*.png"))
        presets = " / ".join(str(p or "-") for p in (spec.get("setting"), spec.get("quick"),
                                                     (spec.get("full") or {}).get("preset")))
        scale, setting = spec.get("scale", ""), spec.get("document_setting") or "not stated"
        first = pd.read_csv(csv, nrows=1) if csv.is_file() else pd.DataFrame()
        if len(first):  # what the committed CSV was actually run at (a spec may be ahead of its CSV)
            ran = str(first["scale"].iloc[0]).split(" [experiment=")[0]  # without the preset's appended overrides
            if ran != str(scale):
                scale = f"spec: {scale}; **the committed CSV ran at: {ran}**"
            if "document_setting" in first:
                setting = str(first["document_setting"].iloc[0])
        lines.append(f"| {tid} | {spec.get('what', '')} | {spec.get('dataset_used', '')} | {presets} | "
                     f"{scale} | {setting} | "
                     f"{'[' + csv.name + '](' + csv.name + ')' if csv.is_file() else 'not generated yet'} | "
                     f"{', '.join('[' + p.name + '](' + p.name + ')' for p in png)} |")
    bench = sorted((ROOT / "results" / "bench").glob("*.txt"))
    if bench:
        lines += ["", "## Benchmarks", ""] + [f"- [bench/{p.name}](bench/{p.name})" for p in bench]
    atomic_write_text(ROOT / "results" / "README.md", "\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'results' / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
