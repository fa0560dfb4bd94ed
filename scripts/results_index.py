#!/usr/bin/env python
"""Write results/README.md: every table ID with its spec, make target, CSV and what was actually run."""
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from sparsebench.core.io import atomic_write_text

    lines = ["# Results", "",
             "One CSV per table/figure ID of `../shared/papers/TABLES.md` (long format: `id, setting, metric, "
             "measured, measured_std, reported, dataset_used, scale, n_seeds` + table-specific columns). "
             "Regenerate one with `make table-<ID>`, all with `make tables`. Benchmarks print their ratios into "
             "`results/bench/`.", "",
             "| ID | what | dataset used here | scale here | CSV | figure |", "|---|---|---|---|---|---|"]
    for spec_path in sorted((ROOT / "experiments").glob("T*.yaml")):
        spec = yaml.safe_load(spec_path.read_text())
        tid = spec["id"]
        csv = ROOT / "results" / f"{tid}.csv"
        png = sorted((ROOT / "results").glob(f"{tid}*.png"))
        lines.append(f"| {tid} | {spec.get('what', '')} | {spec.get('dataset_used', '')} | {spec.get('scale', '')} | "
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
