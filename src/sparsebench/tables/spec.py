"""Table specs: load and validate ``experiments/<ID>.yaml`` and expand it into cells.

A spec names the Hydra presets of ``conf/experiment/`` that hold the settings every row shares, and
lists its rows as deltas (see ``results/README.md`` for the format and the recipe for a new table)::

    id: T001-3.4
    document: 001_8a77eefa87ff613d.txt
    what: one line
    dataset_used: mnist
    scale: "honest description of the reduced scale"   # the preset's overrides are appended
    seeds: [0, 1]
    setting: T001/reduced      # conf/experiment/T001/reduced.yaml: what `make table-<ID>` runs
    quick: T001/quick          # its values are appended AFTER each row's overrides (--quick)
    full: {preset: T001/full}  # the document's setting (--full); optional `cells: [labels]` subset
    builder: sparsebench.tables.builders.t001:thesis_table
    rows:
      - label: "faiss LSH bits={method.bits}"       # {key} is filled from the sweep
        overrides: [method=faiss_grow, method.metric=lsh]
        sweep: {method.bits: [0.5, 1]}               # optional grid (cartesian product, first key outermost)
        full: [method.max_rows=4096]                 # optional: appended in the full setting (false: skip)
        seeds: [0]                                   # optional: this row's seeds instead of the spec's
        reported: {"faiss LSH bits=0.5": {acc: 72.46}, "faiss LSH bits=1": {acc: 72.8}}
        # builder-specific keys (role, note, ...) are kept on the row

A row without ``sweep`` has ``reported: {metric: value}``; a row with a sweep keys ``reported`` by
the cell labels it expands to. Cells are identified by label (unique within a spec), never by
position. Specs whose builder measures everything itself have no rows.
"""
from __future__ import annotations

import importlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from sparsebench.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = ROOT / "experiments"

QUICK_PREFIX = "QUICK SMOKE TEST"  # starts spec["scale"] when make_table runs a quick smoke test
MODES = ("setting", "quick", "full")
REQUIRED = ("id", "builder", "dataset_used", "scale")
ROW_KEYS = {"label", "overrides", "sweep", "reported", "full", "quick_seeds", "seeds"}  # others go to the builder
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


@dataclass
class Cell:
    """One setting of a table: a row of the spec with one point of its sweep.

    ``overrides``: the row's Hydra overrides plus the sweep point (no preset, seed or table ID);
    ``params``: the same as ``{key: value}`` (values parsed as YAML), for builders;
    ``reported``: ``{metric: value}``, the document's numbers for this cell.
    """

    index: int
    label: str
    overrides: List[str]
    params: Dict[str, Any]
    reported: Dict[str, Any]
    row: dict
    quick_seeds: Optional[List[int]] = None
    full: Any = field(default_factory=list)


def parse_value(text: str) -> Any:
    """The value of an override's right-hand side, parsed as YAML (``0.05`` -> float, ``null`` -> None)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def render_value(v: Any) -> str:
    """A value as Hydra override text (``None`` -> ``null``, lists as ``[a,b]``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(render_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def split_override(ov: str) -> tuple:
    """``"method.k=5"`` -> ``("method.k", 5)``; a leading ``+``/``~`` is kept on the key."""
    key, sep, val = ov.partition("=")
    if not sep:
        raise ConfigError(f"override '{ov}' is not key=value")
    return key.strip(), parse_value(val)


def _flatten(node: Any, prefix: str, out: List[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out.append(f"{prefix}={render_value(node)}")


def preset_path(name: str) -> Path:
    from sparsebench.api import CONF_DIR

    return Path(CONF_DIR) / "experiment" / f"{name}.yaml"


def preset_overrides(name: str) -> List[str]:
    """The overrides a preset ``conf/experiment/<name>.yaml`` stands for, as ``key=value`` strings:
    its ``override /group: option`` defaults as ``group=option``, then its values as dotted keys.

    Raises:
        ConfigError: no such preset, or a defaults entry other than ``override /group: option``.
    """
    path = preset_path(name)
    if not path.is_file():
        raise ConfigError(f"experiment preset '{name}': no {path}")
    text = path.read_text()
    if "@package _global_" not in text.split("\n", 1)[0]:
        raise ConfigError(f"{path}: first line must be '# @package _global_'")
    body = yaml.safe_load(text) or {}
    out: List[str] = []
    for entry in body.pop("defaults", []) or []:
        key, val = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else (None, None)
        if not (isinstance(key, str) and key.startswith("override /")):
            raise ConfigError(f"{path}: defaults entry {entry!r} is not 'override /group: option'")
        out.append(f"{key[len('override /'):]}={render_value(val)}")
    _flatten(body, "", out)
    return out


def fill_label(template: str, point: Dict[str, Any], where: str = "label") -> str:
    """``template`` with each ``{key}`` replaced by ``point[key]`` rendered as override text.

    Raises:
        ConfigError: a placeholder names no key of ``point``.
    """
    def sub(m):
        if m.group(1) not in point:
            raise ConfigError(f"{where}: placeholder {{{m.group(1)}}} names none of {sorted(point)}")
        return render_value(point[m.group(1)])

    return _PLACEHOLDER.sub(sub, template)


def _row_cells(spec_id: str, i: int, row: dict, start: int) -> List[Cell]:
    where = f"table {spec_id}, row {i} ({row.get('label', '?')})"
    if "label" not in row:
        raise ConfigError(f"{where}: missing 'label'")
    overrides = [str(o) for o in row.get("overrides", [])]
    sweep = row.get("sweep") or {}
    if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
        raise ConfigError(f"{where}: 'sweep' must map keys to non-empty lists")
    points = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())] if sweep else [{}]
    reported = row.get("reported") or {}
    cells = []
    for point in points:
        label = fill_label(str(row["label"]), point, where) if sweep else str(row["label"])
        ovs = overrides + [f"{k}={render_value(v)}" for k, v in point.items()]
        rep = reported.get(label, {}) if sweep else reported
        cells.append(Cell(start + len(cells), label, ovs, dict(split_override(o) for o in ovs), dict(rep or {}),
                          row, row.get("quick_seeds"), row.get("full", [])))
    if sweep:
        unknown = set(reported) - {c.label for c in cells}
        if unknown:
            raise ConfigError(f"{where}: 'reported' keys {sorted(unknown)} are not labels of the row's cells "
                              f"({[c.label for c in cells]})")
    return cells


def expand(spec: dict) -> List[Cell]:
    """Every cell of ``spec`` in row order (sweeps expanded). Raises ConfigError on a duplicate label."""
    cells: List[Cell] = []
    for i, row in enumerate(spec.get("rows") or []):
        if not isinstance(row, dict):
            raise ConfigError(f"table {spec['id']}: row {i} is not a mapping")
        cells += _row_cells(spec["id"], i, row, len(cells))
    seen = set()
    for c in cells:
        if c.label in seen:
            raise ConfigError(f"table {spec['id']}: duplicate cell label '{c.label}'")
        seen.add(c.label)
    return cells


def validate_spec(spec: dict, where: str = "spec") -> dict:
    """Check the keys of a spec (see the module docstring) and its presets. Returns ``spec``.

    Raises:
        ConfigError: a missing key, an unknown row key shape, a missing preset, an unknown full-cell label.
    """
    for key in REQUIRED:
        if key not in spec:
            raise ConfigError(f"{where}: missing key '{key}'")
    if "runs" in spec or "full_scale" in spec or "settings" in spec:
        raise ConfigError(f"{where}: old spec format ('runs'/'settings'/'full_scale'); use 'rows' and presets")
    cells = expand(spec)
    for key in ("setting", "quick"):
        if spec.get(key):
            preset_overrides(spec[key])
    full = spec.get("full")
    if full:
        if not isinstance(full, dict) or "preset" not in full:
            raise ConfigError(f"{where}: 'full' must be {{preset: <name>, cells: [labels] (optional)}}")
        preset_overrides(full["preset"])
        unknown = set(full.get("cells") or []) - {c.label for c in cells}
        if unknown:
            raise ConfigError(f"{where}: full.cells {sorted(unknown)} are not cell labels")
    return spec


def read_spec(path: Path) -> dict:
    """Load and validate the spec at ``path``."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    return validate_spec(spec, str(path))


def load_spec(table_id: str) -> dict:
    """Read ``experiments/<table_id>.yaml``. Raises ConfigError naming the file when absent or invalid."""
    path = EXPERIMENTS / f"{table_id}.yaml"
    if not path.is_file():
        raise ConfigError(f"table {table_id}: no {path} (known: {', '.join(table_ids())})")
    return read_spec(path)


def table_ids() -> List[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("T*.yaml"))


def mode_cells(spec: dict, mode: str) -> List[Cell]:
    """The cells run in ``mode`` (``setting`` | ``quick`` | ``full``); full mode keeps ``full.cells``
    (all by default) minus rows with ``full: false``, with each row's ``full`` overrides appended.

    Raises:
        ConfigError: full mode on a spec without ``full``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode '{mode}' (allowed: {', '.join(MODES)})")
    cells = expand(spec)
    if mode != "full":
        return cells
    if not spec.get("full"):
        raise ConfigError(f"table {spec['id']}: experiments/{spec['id']}.yaml has no 'full' preset")
    keep = spec["full"].get("cells")
    out = []
    for c in cells:
        if c.full is False or (keep and c.label not in keep):
            continue
        extra = [str(o) for o in (c.full or [])]
        out.append(Cell(c.index, c.label, c.overrides + extra, {**c.params, **dict(split_override(o) for o in extra)},
                        c.reported, c.row, c.quick_seeds, c.full))
    return out


def cell_overrides(spec: dict, cell: Cell, mode: str, seed: int) -> List[str]:
    """The complete Hydra override list of one cell and seed, in precedence order: preset, the cell's
    overrides, ``seed``, ``table``, then (quick mode) the quick preset's values."""
    preset = spec["full"]["preset"] if mode == "full" else spec.get("setting")
    ov = ([f"+experiment={preset}"] if preset else []) + list(cell.overrides) + [f"seed={seed}", f"table={spec['id']}"]
    if mode == "quick" and spec.get("quick"):
        ov += preset_overrides(spec["quick"])
    return ov


def cell_seeds(spec: dict, cell: Cell, mode: str, requested: Optional[List[int]] = None) -> List[int]:
    """Seeds of a cell: in quick mode the row's or the spec's ``quick_seeds`` when given; else the row's
    ``seeds`` when given (e.g. one seed for a much longer run), else the spec's ``seeds``. ``requested``
    (``make_table.py --seeds``) replaces the spec's seeds and is intersected with a row's own ``seeds``."""
    if mode == "quick":
        qs = cell.quick_seeds if cell.quick_seeds is not None else spec.get("quick_seeds")
        if qs is not None:
            return list(requested if requested is not None else qs)
    own = cell.row.get("seeds") if mode != "quick" else None
    if requested is not None:
        return [s for s in requested if own is None or s in own]
    return list(own if own is not None else spec.get("seeds", [0]))


def is_quick(spec: dict) -> bool:
    """True when the spec is being run as a quick smoke test (its ``scale`` starts with QUICK_PREFIX)."""
    return str(spec.get("scale", "")).startswith(QUICK_PREFIX)


def describe(spec: dict, mode: str) -> dict:
    """``spec`` with ``scale`` (and, in full mode, ``dataset_used``) generated from its presets."""
    spec = dict(spec)
    if mode == "full":
        ovs = preset_overrides(spec["full"]["preset"])
        datasets = sorted({str(parse_value(o.split("=", 1)[1])) for c in mode_cells(spec, "full")
                           for o in ovs + c.overrides if o.startswith("dataset=")})
        spec["dataset_used"] = ", ".join(datasets) or spec["dataset_used"]
        spec["scale"] = f"FULL SCALE (the document's setting): experiment={spec['full']['preset']} ({' '.join(ovs)})"
        return spec
    if spec.get("setting"):
        spec["scale"] = f"{spec['scale']} [experiment={spec['setting']}: {' '.join(preset_overrides(spec['setting']))}]"
    if mode == "quick":
        quick = " ".join(preset_overrides(spec["quick"])) if spec.get("quick") else ""
        spec["scale"] = f"{QUICK_PREFIX} (experiment={spec.get('quick')}: {quick}); full: {spec['scale']}"
    return spec


def get_builder(spec: dict) -> Callable:
    """The builder function named by ``spec['builder']`` (``module:function``)."""
    mod, _, fn = spec["builder"].partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"table {spec['id']}: builder {spec['builder']}: {err}") from None
