"""Pruning after training: train densely once (through the shared trainer), then prune and evaluate.

Methods (``method.name``):

* ``magnitude``: prune to ``density`` by |w| (``scope=layer`` or ``global``), evaluate, optionally
  fine-tune with the mask fixed (Han et al. 2015, "Learning both Weights and Connections").
* ``unit_prune`` (document 002, T002-weight/-unit/-magnitudes): for every criterion of
  :data:`~sparsebench.sparsity.units.UNIT_CRITERIA` and every k prune a copy *per layer* and evaluate
  (no fine-tuning). The output layer is not pruned unless ``method.prune_output``. At
  ``method.hist_k`` the |w| histograms of pruned vs surviving weights are written to
  ``<run_dir>/magnitudes.csv`` and their Kolmogorov-Smirnov distance is reported (document 002's
  "Theorem 1": unit pruning removes weights nearly at random with respect to |w|).
* ``randomized_prune`` (document 000, T000-random-prune): the strategies of :data:`PRUNE_STRATEGIES`
  (threshold fraction, random, importance-weighted random, fractional random threshold) applied to
  chosen layers (``method.layers``) at one or several fractions (``method.fractions``), each removing
  exactly ``round(fraction * n)`` connections; all are evaluated on the same trained network.
* ``ls_unit_prune`` (document 004, T004-train/-prune; Castellano, Fanelli & Pelillo 1997): repeatedly
  remove the hidden unit h* of the last hidden layer whose contribution ``b_ih = w_ih * y_h(x)`` to the
  outputs has the smallest norm over outputs i and training samples x, and (``ls`` update of
  :data:`~sparsebench.sparsity.units.LS_UPDATES`) least-squares-adjust the remaining hidden-to-output
  weights so that they reproduce the old net inputs of the outputs; ``none`` removes the unit only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from sparsebench.config import MethodConfig, check, check_density, check_fraction
from sparsebench.core.errors import ConfigError
from sparsebench.core.io import atomic_write_csv
from sparsebench.data import DataBundle, Split
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.sparsity.masking import Masking, neuron_accounting
from sparsebench.sparsity.randomized import PRUNE_STRATEGIES, n_prune
from sparsebench.sparsity.selection import SCOPES, magnitude_masks
from sparsebench.sparsity.units import (DEFAULT_KS, LS_UPDATES, UNIT_CRITERIA, check_ks, hidden_outputs,
                                        prunable_layers, zero_dead_unit_biases)
from sparsebench.training.callbacks import Callback
from sparsebench.core.seeding import derive_seed


# --------------------------------------------------------------------------- magnitude
@dataclass
class MagnitudeConfig(MethodConfig):
    name: str = "magnitude"
    density: float = 0.1
    scope: str = "layer"  # a name of sparsebench.sparsity.selection.SCOPES: layer | global
    finetune_epochs: int = 0

    def __post_init__(self):
        check_density("method.density", self.density)
        SCOPES.get(self.scope)
        check(self.finetune_epochs >= 0, "method.finetune_epochs", self.finetune_epochs, "must be >= 0")


@METHODS.register("magnitude", schema=MagnitudeConfig)
class MagnitudePruning(Method):
    """One-shot magnitude pruning after dense training; rows ``dense``, ``pruned`` (and ``finetuned``)."""

    def run(self) -> pd.DataFrame:
        ctx = self.ctx
        model = ctx.new_model()
        masking = ctx.masking(model)
        trainer = ctx.trainer(model, masking, prefix="dense/")
        dense = trainer.fit()
        rows = [self.row(stage="dense", density=1.0, **dense)]
        masking.set_masks(magnitude_masks(masking, self.cfg.density, scope=self.cfg.scope))
        rows.append(self.row(stage="pruned", density=masking.density(), **trainer.evaluate_splits(("val", "test"))))
        if self.cfg.finetune_epochs:
            ft_cfg = OmegaConf.merge(ctx.cfg.trainer, {"epochs": self.cfg.finetune_epochs, "iterations": None})
            ft = ctx.trainer(model, masking, prefix="finetune/", seed_name="finetune", trainer_cfg=ft_cfg).fit()
            rows.append(self.row(stage="finetuned", density=masking.density(), **ft))
        return pd.DataFrame(rows)


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
        check_ks("method.ks", self.ks)
        for c in self.criteria:
            UNIT_CRITERIA.get(c)
        check_fraction("method.hist_k", self.hist_k)
        check(self.hist_bins >= 2, "method.hist_bins", self.hist_bins, "must be >= 2")
        check(self.ks_sample >= 10, "method.ks_sample", self.ks_sample, "must be >= 10")


def magnitude_split(masking: Masking, trained: Dict[str, torch.Tensor], names: List[str], bins: int,
                    sample: int, generator: torch.Generator) -> tuple[pd.DataFrame, Dict[str, float]]:
    """Histograms of the trained |w| of pruned vs surviving weights per layer, and summary statistics.

    Args:
        masking: holds the current masks (0 = pruned).
        trained: ``{param name: trained weight}`` (the values before pruning zeroed them).
        names: layers to include.
        bins: histogram bins over ``[0, max |w|]`` per layer; sample: at most this many values per group
            (drawn with ``generator``) enter the Kolmogorov-Smirnov statistic.

    Returns:
        (long table ``layer, bin_left, bin_right, pruned, surviving``, stats) where stats has
        ``ks_mean`` (mean over layers of the two-sample Kolmogorov-Smirnov statistic between pruned and
        surviving |w|: 1 = fully separated, ~0 = same distribution), ``mean_abs_pruned``,
        ``mean_abs_surviving`` (pooled).
    """
    from scipy.stats import ks_2samp

    def sub(t):
        return t[torch.randperm(t.numel(), generator=generator)[:sample]].numpy() if t.numel() > sample else t.numpy()

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
        names = prunable_layers(masking, cfg.prune_output)
        gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "unit_prune"))
        rows, hists = [], []
        for crit_name in cfg.criteria:
            crit = UNIT_CRITERIA.get(crit_name)()
            for k in cfg.ks:
                model.load_state_dict(trained)
                masking.set_masks(crit.masks(masking, names, float(k)))
                units = zero_dead_unit_biases(masking, names) if crit.removes_units else 0
                ev = trainer.evaluate_splits(("test", "val"))
                acc = neuron_accounting(masking)
                counts = masking.counts()
                row = self.row(criterion=crit_name, k=float(k), density=masking.density(),
                               pruned_layer_density=sum(counts[n][0] for n in names) / sum(counts[n][1] for n in names),
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


# --------------------------------------------------------------------------- randomized pruning (000)
@dataclass
class RandomizedPruneConfig(MethodConfig):
    """``method=randomized_prune``: document 000's pruning strategies on chosen layers after training.

    Every strategy removes exactly ``round(fraction * n)`` connections of the ``n`` weights of the
    chosen layers (pooled into one vector when a choice matches several layers), so the strategies
    differ only in *which* connections they remove.
    """

    name: str = "randomized_prune"
    layer: str = "layers.2.weight"  # fnmatch pattern of the pruned layer(s) (used when `layers` is empty)
    fraction: float = 0.5  # share of the chosen layers' connections pruned (used when `fractions` is empty)
    # sweep (one trained net serves every point): {choice name: fnmatch pattern}, e.g.
    # {hidden: layers.0.weight, output: layers.2.weight, both: "layers.*.weight"}; empty = {layer: layer}
    layers: Dict[str, str] = field(default_factory=dict)
    fractions: List[float] = field(default_factory=list)  # empty = [fraction]
    random_part: float = 0.5  # fractional_threshold: share of the smallest-|w| candidates pruned
    temperature: float = 1.0  # importance_random: p(prune) ~ exp(-|w| / (temperature * mean|w|))
    draws: int = 5  # random masks per randomized strategy (mean and std reported)
    strategies: List[str] = field(default_factory=lambda: ["none", "threshold", "random", "importance_random",
                                                           "fractional_threshold"])

    def __post_init__(self):
        check_fraction("method.fraction", self.fraction)
        for f in self.fractions:
            check_fraction("method.fractions", f)
        check_fraction("method.random_part", self.random_part, closed_right=True)
        check(self.temperature > 0, "method.temperature", self.temperature, "must be > 0")
        check(self.draws >= 1, "method.draws", self.draws, "must be >= 1")
        for s in self.strategies:
            PRUNE_STRATEGIES.get(s)


@METHODS.register("randomized_prune", schema=RandomizedPruneConfig)
class RandomizedPrune(Method):
    """Train densely once, then for every layer choice, fraction and strategy prune a copy and evaluate.

    One row per (layer choice, fraction, strategy) with mean/std over ``draws`` random masks of
    ``test_acc``, ``val_acc``, ``test_loss`` and the number of connections pruned (``pruned``, equal
    across strategies: ``round(fraction * layer_size)``; ``none`` prunes 0).

    Raises:
        ConfigError: a layer pattern matches no prunable layer.
    """

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        choices = dict(cfg.layers) if cfg.layers else {cfg.layer: cfg.layer}
        chosen = {}
        for key, pattern in choices.items():
            names = masking.matching([pattern])
            if not names:
                raise ConfigError(f"method.layer={pattern!r} ({key}): matches no layer "
                                  f"(prunable: {', '.join(masking.names)})")
            chosen[key] = names
        fractions = list(cfg.fractions) or [cfg.fraction]
        trainer = ctx.trainer(model, masking)
        dense = trainer.fit()
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "randomized_prune"))
        rows = []
        for key, names in chosen.items():
            sizes = [masking.weight(n).numel() for n in names]
            n = sum(sizes)
            for fraction in fractions:
                k = n_prune(n, fraction)
                for sname in cfg.strategies:
                    strategy = PRUNE_STRATEGIES.get(sname)()
                    draws = cfg.draws if strategy.randomized else 1
                    res = []
                    for _ in range(draws):
                        model.load_state_dict(trained)
                        flat = torch.cat([masking.weight(m).detach().reshape(-1).cpu() for m in names])
                        mask = strategy.mask(flat, cfg, gen, k=0 if sname == "none" else k)
                        for m, part in zip(names, torch.split(mask, sizes)):
                            w = masking.weight(m)
                            masking.set_mask(m, part.view(w.shape).to(w.device))
                        ev = trainer.evaluate_splits(("test", "val"))
                        ev["pruned"] = int(sum(masking.weight(m).numel() - int(masking.mask(m).count_nonzero())
                                               for m in names))
                        res.append(ev)
                    df = pd.DataFrame(res)
                    vals = {c: float(df[c].mean()) for c in df.columns}
                    vals["test_acc_std"] = float(df["test_acc"].std(ddof=1)) if len(df) > 1 else 0.0
                    rows.append(self.row(strategy=sname, layer_choice=key, layer=",".join(names),
                                         fraction=float(fraction), draws=draws, layer_size=int(n),
                                         dense_test_acc=dense["test_acc"], **vals))
                    ctx.metrics.log(trainer.step, {f"{key}/{fraction}/{sname}/test_acc": vals["test_acc"]})
        model.load_state_dict(trained)  # the masks are buffers: this leaves the trained net dense
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- least-squares unit pruning (004)
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
            LS_UPDATES.get(u)
        check(self.max_removed is None or self.max_removed >= 1, "method.max_removed", self.max_removed,
              "must be >= 1 or null")
        check(self.train_fraction is None or 0.0 < self.train_fraction < 1.0, "method.train_fraction",
              self.train_fraction, "must be in (0, 1) or null")
        check(self.curve_every >= 0, "method.curve_every", self.curve_every, "must be >= 0")


class CurveLogger(Callback):
    """Logs ``curve/test_acc``, ``curve/test_loss`` and ``curve/train_loss`` (mean loss of the updates
    since the last point) at step 0 and every ``every`` optimizer steps: training curves finer than
    one point per epoch (one online epoch over 18k MNIST samples is one epoch). Resumable."""

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

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n": self._n}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._n = float(state["sum"]), int(state["n"])


def resplit(data: DataBundle, train_fraction: float, seed: int) -> DataBundle:
    """Pool ``train`` and ``val`` and split them again: ``round(train_fraction * N)`` seeded samples for
    training, the rest as the test split (val becomes empty). The original test split is dropped."""
    x = torch.cat([data.train.x, data.val.x])
    y = torch.cat([data.train.y, data.val.y])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(seed, "resplit")))
    n_tr = int(round(train_fraction * len(y)))
    tr, te = perm[:n_tr], perm[n_tr:]
    return DataBundle(data.name, data.kind, Split(x[tr], y[tr]), Split(x[:0], y[:0]), Split(x[te], y[te]),
                      data.num_classes)


@METHODS.register("ls_unit_prune", schema=LsUnitPruneConfig)
class LsUnitPrune(Method):
    """Train the MLP (shared trainer, resumable), then remove hidden units of the last hidden layer one
    at a time.

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
        model = ctx.new_model()
        masking = ctx.masking(model)
        if len(masking.names) < 2:
            raise ConfigError(f"model={ctx.cfg.model.name}: least-squares unit pruning needs a hidden layer")
        trainer = ctx.trainer(model, masking, data=data,
                              callbacks=[CurveLogger(cfg.curve_every)] if cfg.curve_every else [])
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

    def _row(self, trainer, update: str, removed: int, units_left: int, final: dict, **extra) -> dict:
        return self.row(update=update, removed=removed, units_left=units_left,
                        **trainer.evaluate_splits(("test", "train")),
                        dense_test_acc=final["test_acc"], train_seconds=final["train_seconds"],
                        steps=final["steps"], n_train=len(trainer.data.train), n_test=len(trainer.data.test),
                        run_dir=str(self.ctx.run_dir.resolve()), **extra)
