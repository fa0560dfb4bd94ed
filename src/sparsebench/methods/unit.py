"""Unit (neuron) pruning against weight pruning, sparse forward time, and least-squares unit pruning.

Methods (``method.name``):

* ``unit_prune`` (document 002, T002-weight/-unit/-magnitudes): train densely, then for every
  criterion and every k prune a copy *per layer* and evaluate (no fine-tuning):
  ``weight`` removes the k fraction of each layer's weights with the smallest |w|; ``unit`` removes
  the k fraction of each layer's units (rows of W, i.e. a unit's incoming weights, and its bias)
  with the smallest L2 norm. The output layer is not pruned unless ``method.prune_output``. At
  ``method.hist_k`` the |w| histograms of pruned vs surviving weights are written to
  ``<run_dir>/magnitudes.csv`` and their Kolmogorov-Smirnov distance is reported (document 002's
  "Theorem 1": unit pruning removes weights nearly at random with respect to |w|).
* ``forward_time`` (T002-time): forward time of a batch through the network pruned per layer to
  each k, dense vs the sparse export of :mod:`sparsebench.sparsity.export` (CSR / COO), on CPU and,
  when available, CUDA.
* ``ls_unit_prune`` (document 004, T004-train/-prune; Castellano, Fanelli & Pelillo 1997, "An
  iterative pruning algorithm for feedforward neural networks", IEEE TNN 8(3)): train the MLP, then
  repeatedly remove the hidden unit h* (of the last hidden layer) whose contribution to the
  outputs ``b_ih = w_ih * y_h(x)`` has the smallest norm over outputs i and training samples x, and
  (``ls`` update) solve ``Y_rest delta_i = b_ih*`` in the least-squares sense for every output i so
  that the remaining hidden-to-output weights ``w_i,rest + delta_i`` reproduce the old net inputs of
  the outputs (``torch.linalg.lstsq``); ``none`` removes the unit without adjusting anything.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparsebench.config import MethodConfig, _check, check_fraction
from sparsebench.data import DataBundle, Split
from sparsebench.core.errors import ConfigError
from sparsebench.core.io import atomic_write_csv
from sparsebench.sparsity.masking import Masking, topk_mask
from sparsebench.core.registry import Registry
from sparsebench.sparsity.export import export_sparse
from sparsebench.training.trainer import Callback, Trainer
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.methods.static import neuron_accounting

DEFAULT_KS = [0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]


# --------------------------------------------------------------------------- criteria (002)
@dataclass(frozen=True)
class PruneCriterion:
    """A post-training layer-wise pruning criterion.

    Attributes:
        masks: ``(masking, layer names, k) -> {name: 0/1 mask}`` removing the k fraction per layer.
        removes_units: whole units are removed, so their biases are zeroed too.
    """

    masks: Callable[[Masking, List[str], float], Dict[str, torch.Tensor]]
    removes_units: bool = False


UNIT_CRITERIA: Registry = Registry("method.criteria")


def weight_pruning_masks(masking: Masking, names: List[str], k: float) -> Dict[str, torch.Tensor]:
    """Per layer, prune the ``round(k * numel)`` weights with the smallest |w| (document 002)."""
    out = {}
    for n in names:
        w = masking.weight(n).detach()
        out[n] = topk_mask(w.abs(), w.numel() - int(round(k * w.numel())))
    return out


def unit_pruning_masks(masking: Masking, names: List[str], k: float) -> Dict[str, torch.Tensor]:
    """Per layer, prune the ``round(k * out)`` units (rows of the ``(out, in, ...)`` weight, i.e. the
    unit's incoming weights) with the smallest L2 norm (document 002)."""
    out = {}
    for n in names:
        w = masking.weight(n).detach()
        norms = w.reshape(w.shape[0], -1).norm(dim=1)
        keep_rows = topk_mask(norms, w.shape[0] - int(round(k * w.shape[0])))
        out[n] = keep_rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w).contiguous()
    return out


UNIT_CRITERIA.register("weight")(PruneCriterion(weight_pruning_masks, removes_units=False))
UNIT_CRITERIA.register("unit")(PruneCriterion(unit_pruning_masks, removes_units=True))


@torch.no_grad()
def zero_dead_unit_biases(masking: Masking, names: List[str]) -> int:
    """Zero the bias of every unit of ``names`` with no active incoming weight; returns how many."""
    n_dead = 0
    for n in names:
        mod = masking.module(n)
        mk = masking.mask(n)
        dead = mk.reshape(mk.shape[0], -1).sum(dim=1) == 0
        if getattr(mod, "bias", None) is not None:
            mod.bias[dead] = 0.0
        n_dead += int(dead.sum())
    return n_dead


def _check_ks(key: str, ks: List[float]) -> None:
    _check(len(ks) > 0, key, list(ks), "needs at least one value")
    for k in ks:
        _check(0.0 <= float(k) < 1.0, key, list(ks), "every k must be in [0, 1)")


def _prunable(masking: Masking, prune_output: bool) -> List[str]:
    return list(masking.names) if prune_output or len(masking.names) == 1 else list(masking.names[:-1])


def _evaluate(trainer: Trainer, splits=("test", "val")) -> Dict[str, float]:
    out = {}
    for s in splits:
        out.update({f"{s}_{k}": v for k, v in trainer.evaluate(getattr(trainer.data, s)).items()})
    return out


# --------------------------------------------------------------------------- unit_prune (002)
@dataclass
class UnitPruneConfig(MethodConfig):
    """``method=unit_prune``: weight vs unit pruning after training, per layer, for every k."""

    name: str = "unit_prune"
    ks: List[float] = field(default_factory=lambda: list(DEFAULT_KS))
    criteria: List[str] = field(default_factory=lambda: ["weight", "unit"])
    prune_output: bool = False  # document 002 leaves the output (logit) layer unpruned
    hist_k: float = 0.5  # k of the pruned-vs-surviving |w| histograms (T002-magnitudes)
    hist_bins: int = 60
    ks_sample: int = 100000  # |w| values per group used for the Kolmogorov-Smirnov distance

    def __post_init__(self):
        _check_ks("method.ks", self.ks)
        for c in self.criteria:
            _check(c in UNIT_CRITERIA, "method.criteria", c, f"unknown (allowed: {', '.join(UNIT_CRITERIA.names())})")
        check_fraction("method.hist_k", self.hist_k)
        _check(self.hist_bins >= 2, "method.hist_bins", self.hist_bins, "must be >= 2")
        _check(self.ks_sample >= 10, "method.ks_sample", self.ks_sample, "must be >= 10")


def magnitude_split(masking: Masking, trained: Dict[str, torch.Tensor], names: List[str], bins: int,
                    sample: int, generator: torch.Generator) -> tuple[pd.DataFrame, Dict[str, float]]:
    """Histograms of the trained |w| of pruned vs surviving weights per layer, and summary statistics.

    Args:
        masking: holds the current masks (0 = pruned).
        trained: ``{param name: trained weight}`` (the values before pruning zeroed them).
        names: layers to include.

    Returns:
        (long table ``layer, bin_left, bin_right, pruned, surviving``, stats) where stats has
        ``ks_mean`` (mean over layers of the two-sample Kolmogorov-Smirnov statistic between pruned and
        surviving |w|: 1 = fully separated, ~0 = same distribution), ``mean_abs_pruned``,
        ``mean_abs_surviving`` (pooled).
    """
    from scipy.stats import ks_2samp

    frames, ks, pr_all, sv_all = [], [], [], []
    for n in names:
        a = trained[n].detach().abs().reshape(-1).float().cpu()
        m = masking.mask(n).reshape(-1).cpu() > 0
        pruned, surv = a[~m], a[m]
        edges = np.linspace(0.0, float(a.max()), bins + 1)
        hp, _ = np.histogram(pruned.numpy(), edges)
        hs, _ = np.histogram(surv.numpy(), edges)
        frames.append(pd.DataFrame({"layer": n, "bin_left": edges[:-1], "bin_right": edges[1:], "pruned": hp,
                                    "surviving": hs}))
        if pruned.numel() and surv.numel():
            def sub(t):
                return t[torch.randperm(t.numel(), generator=generator)[:sample]].numpy() if t.numel() > sample \
                    else t.numpy()
            ks.append(float(ks_2samp(sub(pruned), sub(surv)).statistic))
        pr_all.append(pruned)
        sv_all.append(surv)
    pr, sv = torch.cat(pr_all), torch.cat(sv_all)
    stats = {"ks_mean": float(np.mean(ks)) if ks else float("nan"),
             "mean_abs_pruned": float(pr.mean()) if pr.numel() else float("nan"),
             "mean_abs_surviving": float(sv.mean()) if sv.numel() else float("nan")}
    return pd.concat(frames, ignore_index=True), stats


@METHODS.register("unit_prune", schema=UnitPruneConfig)
class UnitPrune(Method):
    """Weight vs unit pruning after dense training (document 002). One row per (criterion, k):
    test/val loss and accuracy, realised ``density``, ``units_removed`` and the neuron accounting;
    the ``hist_k`` rows also carry ``ks_mean``, ``mean_abs_pruned``, ``mean_abs_surviving`` and
    ``run_dir`` (where ``magnitudes.csv`` lies)."""

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        trainer = ctx.trainer(model, masking)
        dense = trainer.fit()
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trained_w = {n: masking.weight(n).detach().clone() for n in masking.names}
        names = _prunable(masking, cfg.prune_output)
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 17)
        rows, hists = [], []
        for crit_name in cfg.criteria:
            crit = UNIT_CRITERIA.get(crit_name)
            for k in cfg.ks:
                model.load_state_dict(trained)
                masking.set_masks(crit.masks(masking, names, float(k)))
                units = zero_dead_unit_biases(masking, names) if crit.removes_units else 0
                ev = _evaluate(trainer)
                acc = neuron_accounting(masking)
                row = self.row(criterion=crit_name, k=float(k), density=masking.density(),
                               pruned_layer_density=sum(masking.counts()[n][0] for n in names) /
                               sum(masking.counts()[n][1] for n in names),
                               units_removed=units, hidden_dead_all=acc.get("hidden_dead_all", float("nan")),
                               dense_test_acc=dense["test_acc"], train_seconds=dense["train_seconds"], **ev)
                if math.isclose(float(k), cfg.hist_k):
                    h, stats = magnitude_split(masking, trained_w, names, cfg.hist_bins, cfg.ks_sample, gen)
                    hists.append(h.assign(criterion=crit_name, k=float(k)))
                    row.update(stats, run_dir=str(ctx.run_dir.resolve()))
                rows.append(row)
                ctx.metrics.log(trainer.step, {f"{crit_name}/k{k:g}/test_acc": ev["test_acc"],
                                               f"{crit_name}/k{k:g}/test_loss": ev["test_loss"]})
        if hists:
            atomic_write_csv(ctx.run_dir / "magnitudes.csv", pd.concat(hists, ignore_index=True))
        model.load_state_dict(trained)
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- forward_time (002)
@dataclass
class ForwardTimeConfig(MethodConfig):
    """``method=forward_time``: dense vs sparse forward time against k (T002-time)."""

    name: str = "forward_time"
    ks: List[float] = field(default_factory=lambda: list(DEFAULT_KS))
    criteria: List[str] = field(default_factory=lambda: ["weight", "unit"])
    layouts: List[str] = field(default_factory=lambda: ["csr", "coo"])
    batch_size: int = 100
    repeats: int = 30  # timed forward passes per variant (interleaved; min and median reported)
    threads: Optional[int] = 1  # torch threads while timing (1: less noise on a shared machine); null = as is
    cuda: bool = True  # also time on CUDA when it is available
    prune_output: bool = False
    train: bool = False  # time the trained net (weights' values do not change the time; off saves time)

    def __post_init__(self):
        _check_ks("method.ks", self.ks)
        for c in self.criteria:
            _check(c in UNIT_CRITERIA, "method.criteria", c, f"unknown (allowed: {', '.join(UNIT_CRITERIA.names())})")
        for lay in self.layouts:
            _check(lay in ("csr", "coo", "auto"), "method.layouts", lay, "unknown (allowed: csr, coo, auto)")
        _check(self.batch_size >= 1, "method.batch_size", self.batch_size, "must be >= 1")
        _check(self.repeats >= 1, "method.repeats", self.repeats, "must be >= 1")
        _check(self.threads is None or self.threads >= 1, "method.threads", self.threads, "must be >= 1 or null")


def time_forward(fns: Dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device
                 ) -> Dict[str, Dict[str, float]]:
    """Time each zero-argument forward in ``fns``, interleaved round-robin (so load changes on a shared
    machine hit every variant alike), after one warm-up call each.

    Returns:
        ``{name: {"min": s, "median": s}}`` in seconds per forward pass.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        sync()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


@METHODS.register("forward_time", schema=ForwardTimeConfig)
class ForwardTime(Method):
    """One row per (device, criterion, k, layout): ``seconds`` (min over repeats), ``seconds_median``,
    ``dense_seconds`` and ``speedup = dense_seconds / seconds`` of a forward pass of ``batch_size``
    real test images."""

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        if cfg.train:
            ctx.trainer(model, masking).fit()
        model = model.cpu().eval()
        x_all = ctx.data.test.x[:cfg.batch_size]
        if x_all.shape[0] < cfg.batch_size:
            raise ConfigError(f"method.batch_size={cfg.batch_size}: the test split has only {x_all.shape[0]} samples")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        names = _prunable(masking, cfg.prune_output)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if cfg.cuda and torch.cuda.is_available() else [])
        old_threads = torch.get_num_threads()
        rows = []
        try:
            if cfg.threads:
                torch.set_num_threads(int(cfg.threads))
            for dev in devices:
                x = x_all.to(dev)
                for crit_name in cfg.criteria:
                    crit = UNIT_CRITERIA.get(crit_name)
                    for k in cfg.ks:
                        model.load_state_dict(state)
                        masking.set_masks(crit.masks(masking, names, float(k)))
                        if crit.removes_units:
                            zero_dead_unit_biases(masking, names)
                        dense_model = model.to(dev)
                        fns = {"dense": lambda m=dense_model: m(x)}
                        for lay in cfg.layouts:
                            exported = export_sparse(dense_model, lay).to(dev)
                            fns[lay] = lambda m=exported: m(x)
                        t = time_forward(fns, cfg.repeats, dev)
                        for lay in cfg.layouts:
                            rows.append(self.row(device=dev.type, criterion=crit_name, k=float(k), layout=lay,
                                                 density=masking.density(), batch_size=cfg.batch_size,
                                                 threads=torch.get_num_threads() if dev.type == "cpu" else None,
                                                 seconds=t[lay]["min"], seconds_median=t[lay]["median"],
                                                 dense_seconds=t["dense"]["min"],
                                                 speedup=t["dense"]["min"] / t[lay]["min"]))
                        model.cpu()
        finally:
            torch.set_num_threads(old_threads)
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- least-squares unit pruning (004)
LS_UPDATES: Registry = Registry("method.updates")


def _ls_update(y: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rest: torch.Tensor, h: int,
               include_bias: bool) -> None:
    """Castellano et al. 1997 update, in place: solve ``A delta = B`` in the least-squares sense with
    ``A = [Y_rest (, 1)]`` ``(n, |rest| (+1))`` and ``B = y_h w_:,h^T`` ``(n, C)`` (the removed unit's
    contribution to every output), then ``w[:, rest] += delta[:|rest|]^T`` (and ``b += delta[-1]``)."""
    a = y[:, rest].double()
    if include_bias and b is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    target = y[:, h:h + 1].double() * w[:, h].double()[None, :]
    delta = torch.linalg.lstsq(a, target).solution  # (|rest| (+1), C)
    w[:, rest] += delta[:len(rest)].t().to(w.dtype)
    if include_bias and b is not None:
        b += delta[len(rest)].to(b.dtype)


LS_UPDATES.register("ls")(_ls_update)
LS_UPDATES.register("none")(lambda *a, **k: None)


@dataclass
class LsUnitPruneConfig(MethodConfig):
    """``method=ls_unit_prune``: iterative least-squares unit pruning of the last hidden layer (004)."""

    name: str = "ls_unit_prune"
    updates: List[str] = field(default_factory=lambda: ["ls", "none"])  # with and without the LS update
    max_removed: Optional[int] = None  # default: all hidden units but one
    include_bias: bool = True  # the LS may also shift the output biases (document 004's bias unit)
    train_fraction: Optional[float] = None  # pool train+val and keep this share for training, the rest is
    # the test split (document 004 on MNIST: 0.3 of the 60k training images); null = dataset's split
    curve_every: int = 0  # also log test accuracy / running train loss every this many online updates (0 = off)

    def __post_init__(self):
        for u in self.updates:
            _check(u in LS_UPDATES, "method.updates", u, f"unknown (allowed: {', '.join(LS_UPDATES.names())})")
        _check(self.max_removed is None or self.max_removed >= 1, "method.max_removed", self.max_removed,
               "must be >= 1 or null")
        _check(self.train_fraction is None or 0.0 < self.train_fraction < 1.0, "method.train_fraction",
               self.train_fraction, "must be in (0, 1) or null")
        _check(self.curve_every >= 0, "method.curve_every", self.curve_every, "must be >= 0")


class CurveLogger(Callback):
    """Logs ``curve/test_acc``, ``curve/test_loss`` and ``curve/train_loss`` (mean loss of the updates
    since the last point) at step 0 and every ``every`` optimizer steps: training curves finer than
    one point per epoch (one online epoch over 18k MNIST samples is one epoch)."""

    def __init__(self, every: int):
        self.every = every
        self._sum, self._n = 0.0, 0

    def _point(self, trainer) -> None:
        if trainer.metrics is None:
            return
        ev = trainer.evaluate(trainer.data.test)
        vals = {"curve/test_acc": ev["acc"], "curve/test_loss": ev["loss"]}
        if self._n:
            vals["curve/train_loss"] = self._sum / self._n
        trainer.metrics.log(trainer.step, vals)
        self._sum, self._n = 0.0, 0

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0:
            self._point(trainer)

    def on_step_end(self, trainer) -> None:
        self._sum += float(trainer.loss)
        self._n += 1
        if trainer.step % self.every == 0:
            self._point(trainer)


def resplit(data: DataBundle, train_fraction: float, seed: int) -> DataBundle:
    """Pool ``train`` and ``val`` and split them again: ``round(train_fraction * N)`` seeded samples for
    training, the rest as the test split (val becomes empty). The original test split is dropped."""
    x = torch.cat([data.train.x, data.val.x])
    y = torch.cat([data.train.y, data.val.y])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 31))
    n_tr = int(round(train_fraction * len(y)))
    tr, te = perm[:n_tr], perm[n_tr:]
    return DataBundle(data.name, data.kind, Split(x[tr], y[tr]), Split(x[:0], y[:0]), Split(x[te], y[te]),
                      data.num_classes)


@torch.no_grad()
def hidden_outputs(model: nn.Module, out_layer: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Inputs of ``out_layer`` (the last hidden layer's activations) for every sample: ``(N, H)``."""
    store: List[torch.Tensor] = []
    handle = out_layer.register_forward_pre_hook(lambda mod, inp: store.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(store)


@METHODS.register("ls_unit_prune", schema=LsUnitPruneConfig)
class LsUnitPrune(Method):
    """Train the MLP, then remove hidden units of the last hidden layer one at a time.

    Selection (both updates): the active unit h with the smallest ``||w_:,h|| * ||y_h||`` = the norm of
    its contributions ``w_ih y_h(x)`` over outputs i and training samples x. Rows: one per (update,
    number removed) with ``units_left``, ``test_acc``, ``train_acc``, ``test_loss``; the row with
    ``removed = 0`` is the trained network (``dense_*`` columns: training time, steps). The training
    curves are in ``metrics.csv``.

    Raises:
        ConfigError: the model has no hidden layer.
    """

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        data = ctx.data
        if cfg.train_fraction is not None:
            data = resplit(data, cfg.train_fraction, int(ctx.cfg.seed))
        from sparsebench.models import build_model
        from sparsebench.training.trainer import set_seed

        set_seed(int(ctx.cfg.seed))
        model = build_model(ctx.cfg.model, data.input_shape, data.num_classes)
        masking = ctx.masking(model)
        if len(masking.names) < 2:
            raise ConfigError(f"model={ctx.cfg.model.name}: least-squares unit pruning needs a hidden layer")
        trainer = Trainer(ctx.cfg.trainer, model, data, ctx.device, masking=masking, seed=int(ctx.cfg.seed),
                          metrics=ctx.metrics, callbacks=[CurveLogger(cfg.curve_every)] if cfg.curve_every else [])
        final = trainer.fit()
        out_name, in_name = masking.names[-1], masking.names[-2]
        out_mod = masking.module(out_name)
        y = hidden_outputs(model, out_mod, trainer.data.train.x)
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        n_units = out_mod.weight.shape[1]
        max_removed = min(cfg.max_removed or n_units - 1, n_units - 1)
        yn = y.norm(dim=0)  # (H,) norm of each unit's output over the samples
        rows = []
        for update in cfg.updates:
            fn = LS_UPDATES.get(update)
            model.load_state_dict(trained)
            active = [h for h in range(n_units) if bool(masking.mask(out_name)[:, h].any())]
            rows.append(self._row(trainer, update, 0, len(active), final))
            for r in range(1, max_removed + 1):
                if len(active) <= 1:
                    break
                with torch.no_grad():
                    w = out_mod.weight
                    contrib = w[:, active].norm(dim=0) * yn[active]
                    h = active[int(torch.argmin(contrib))]
                    active.remove(h)
                    fn(y, w, out_mod.bias, torch.tensor(active, device=y.device), h, cfg.include_bias)
                    m_out = masking.mask(out_name).clone()
                    m_out[:, h] = 0
                    masking.set_mask(out_name, m_out)
                    if masking.mask(in_name).shape[0] == n_units:
                        m_in = masking.mask(in_name).clone()
                        m_in[h] = 0
                        masking.set_mask(in_name, m_in)
                rows.append(self._row(trainer, update, r, len(active), final, removed_unit=h))
                ctx.metrics.log(trainer.step + r, {f"{update}/test_acc": rows[-1]["test_acc"]})
        model.load_state_dict(trained)
        return pd.DataFrame(rows)

    def _row(self, trainer: Trainer, update: str, removed: int, units_left: int, final: dict, **extra) -> dict:
        ev = _evaluate(trainer, ("test", "train"))
        return self.row(update=update, removed=removed, units_left=units_left, **ev,
                        dense_test_acc=final["test_acc"], train_seconds=final["train_seconds"],
                        steps=final["steps"], n_train=len(trainer.data.train), n_test=len(trainer.data.test),
                        run_dir=str(self.ctx.run_dir.resolve()), **extra)
