#!/usr/bin/env python
"""Regenerate one paper table: ``python scripts/make_table.py T003-imp [--quick | --full] [--seeds 0,1] [--out DIR]``.

Runs the cells of ``experiments/<ID>.yaml`` (finished runs are reused via their config hash; one
progress line per cell and seed) and writes ``results/<ID>.csv`` with the reported values beside the
measured ones. Default: the spec's ``setting`` preset; ``--quick``: plus its ``quick`` preset (a smoke
test); ``--full``: its ``full`` preset, the document's setting (CSV into ``results/full/``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparsebench.core.errors import SparsebenchError  # noqa: E402
from sparsebench.tables.runner import make_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("table_id")
    ap.add_argument("--quick", action="store_true", help="apply the spec's quick preset after each cell (smoke test)")
    ap.add_argument("--full", action="store_true",
                    help="run the spec's full preset (the document's setting; needs its data, usually a GPU) "
                         "and write results/full/<ID>.csv")
    ap.add_argument("--out", default=None, help="output directory (default results/, results/full/ with --full, "
                    "<tmp>/sparsebench-quick/ with --quick)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds overriding the spec's")
    ap.add_argument("--finished-only", action="store_true",
                    help="train nothing: build the CSV from the runs that have finished (the others are listed)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        path = make_table(a.table_id, quick=a.quick, out_dir=a.out, extra=a.overrides, seeds=seeds, full=a.full, say=say,
                          finished_only=a.finished_only)
    except SparsebenchError as err:
        print(f"{err.prefix}: {err}", file=sys.stderr)
        return err.exit_code  # 2; 144 (submitit's requeue code) when stopped by SIGTERM / SIGUSR1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
