"""Config composition and validation: every group composes, bad input fails in one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsebench.api import CONF_DIR, compose, validate
from sparsebench.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_dataset_model_combination_composes(dataset, model):
    from sparsebench.data import DATASETS

    cfg = compose([f"dataset={dataset}", f"model={model}"])
    if cfg.model.arch == "wrn" and DATASETS.get(dataset).kind == "tabular":
        with pytest.raises(ConfigError, match=r"^model=wrn.*tabular"):
            validate(cfg)
    else:
        v = validate(cfg)
        assert v.dataset.name == dataset and v.model.name == model


@pytest.mark.parametrize("overrides,key", [
    (["method=magnitude", "method.density=1.5"], "method.density"),
    (["method=magnitude", "method.density=0"], "method.density"),
    (["trainer.lr=-0.1"], "trainer.lr"),
    (["model=wrn28x5", "dataset=mnist", "model.depth=27"], "model.depth"),
    (["method.prune_rate=1.0"], "method.prune_rate"),
    (["trainer.optimizer=adagrad"], "trainer.optimizer"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
    (["trainer.sparse_backend=cusparse_lt"], "trainer.sparse_backend"),
])
def test_bad_values_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg


@pytest.mark.parametrize("overrides,key", [
    (["method.foo=1"], "method.foo"),
    (["trainer.lr=fast"], "trainer.lr"),
    (["method.rounds=abc"], "method.rounds"),
])
def test_unknown_key_or_wrong_type_fails_at_compose(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_every_group_file_extends_its_schema():
    for path in CONF_DIR.glob("*/*.yaml"):
        data = yaml.safe_load(path.read_text())
        defaults = data.get("defaults", [])
        want = f"_schema_{data['name']}" if path.parent.name == "method" else "_schema"
        assert want in defaults, f"{path}: add 'defaults: [{want}, _self_]'"


def test_group_files_hold_only_deltas_from_the_schema():
    import dataclasses

    from sparsebench.config import GROUP_SCHEMAS

    for group, schema in GROUP_SCHEMAS.items():
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(schema)}
        for path in (CONF_DIR / group).glob("*.yaml"):
            data = yaml.safe_load(path.read_text())
            restated = [k for k, v in data.items() if k not in ("defaults", "name") and k in defaults
                        and defaults[k] == v]
            assert not restated, f"{path}: {restated} restate the schema default (remove them)"


def test_config_is_a_leaf_layer():
    code = ("import sys, sparsebench.config, sparsebench.config.validation, sparsebench.config.identity; "
            "print(sorted(m for m in sys.modules if m.startswith('sparsebench.') and not "
            "m.startswith(('sparsebench.config', 'sparsebench.core'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_names_are_checked_against_the_registries():
    from sparsebench.models import ARCHS
    from sparsebench.training.optim import OPTIMIZERS

    with pytest.raises(ConfigError, match=r"^model.arch='vit': unknown \(allowed: mlp, wrn\)"):
        validate(compose(["model.arch=vit"]))
    ARCHS.register("toy_arch")(lambda cfg, shape, n: None)
    OPTIMIZERS.register("toy_opt")(lambda cfg, params: None)
    try:  # a registered name is accepted without touching config/
        v = validate(compose(["model.arch=toy_arch", "trainer.optimizer=toy_opt"]))
        assert v.model.arch == "toy_arch" and v.trainer.optimizer == "toy_opt"
    finally:
        for reg, name in ((ARCHS, "toy_arch"), (OPTIMIZERS, "toy_opt")):
            del reg._entries[name], reg._schemas[name], reg._meta[name]


def test_help_lists_real_options_only(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "_schema" not in p.stdout.split("== Config ==")[0]
    groups = p.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    for group in ("dataset", "model", "method", "trainer", "logger"):
        options = sorted(q.stem for q in (CONF_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in groups, groups


@pytest.mark.parametrize("args,needle", [
    (["method=nope"], "method=nope: unknown option (allowed:"),
    (["method.density=2", "method=magnitude"], "method.density=2.0: density must be in (0, 1]"),
    (["model=wrn28x5"], "model=wrn28x5: a WideResNet needs image data"),
    (["trainer.momentum=x"], "trainer.momentum"),
])
def test_cli_prints_one_line_and_exits_2(args, needle, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_dir={tmp_path}", *args], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_sparse_backend_that_cannot_run_here_fails_naming_the_key(monkeypatch):
    from sparsebench.sparsity.kernels import KERNELS

    assert validate(compose(["trainer.sparse_backend=torch_csr"])).trainer.sparse_backend == "torch_csr"
    monkeypatch.setitem(KERNELS.meta("sparseprop"), "available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.sparse_backend=sparseprop: cannot run here"):
        validate(compose(["trainer.sparse_backend=sparseprop"]))
