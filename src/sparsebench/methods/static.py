"""Static sparsity: masks chosen once (at initialisation or after training) and then kept fixed.

Methods (``method.name``):

* ``random_prune``: random masks at initialisation under any layer-wise budget of
  :mod:`sparsebench.sparsity.distributions` (``uniform``, ``uniform+``, ``er``, ``erk``, ``erk+``, ``snip_ratio``,
  ``global``), then training with the mask fixed (document 003, section III; Liu et al. 2022,
  "The Unreasonable Effectiveness of Random Pruning"). ``snip_ratio`` keeps only the per-layer
  densities of SNIP's global top-k; positions are random.
* ``snip``: SNIP (Lee, Ajanthan & Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", eq. 6): keep the global top-k of the connection sensitivity ``|w * dL/dw|`` at
  initialisation, computed on ``method.batches`` minibatches, then train with the mask fixed.
* ``randomized_prune``: the four pruning strategies of document 000 (threshold fraction, random,
  importance-weighted random, fractional random threshold) applied after training to one chosen
  layer; each strategy is evaluated on the same trained network (T000-random-prune).
* ``lth_imp_neurons``: ``lth_imp`` (iterative magnitude pruning with rewinding) whose round rows and
  metrics log also carry the per-layer neuron accounting of :func:`neuron_accounting` (T003-neurons).

Every method logs the neuron-level accounting of its masks (units of a hidden layer left with no
incoming or no outgoing active connection).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pandas as pd
import torch
from torch import nn

from sparsebench.sparsity.distributions import BUDGETS, layer_counts, random_masks
from sparsebench.config import MethodConfig, _check, check_density, check_fraction
from sparsebench.core.errors import ConfigError
from sparsebench.sparsity.masking import Masking, topk_mask
from sparsebench.core.registry import Registry
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.methods.pruning import LotteryTicketIMP, LthImpConfig


# --------------------------------------------------------------------------- neuron accounting
def neuron_accounting(masking: Masking) -> Dict[str, float]:
    """Per-layer neuron-level accounting of the current masks (flat ``{metric/layer: value}``).

    For every prunable layer ``n`` with weight ``(out, in, ...)``:

    * ``units_no_in/<n>``: fraction of its ``out`` units with no active incoming connection;
    * ``units_no_out/<n>``: fraction of its ``in`` units with no active outgoing connection.

    For every hidden layer of a chain of consecutive prunable layers whose shapes connect
    (``out`` of layer l == ``in`` of layer l+1, as in an MLP), ``hidden_dead/<n>`` is the fraction of
    the units produced by layer ``n`` that have no incoming *or* no outgoing connection, i.e. that
    carry no information forward (document 003, "neuron pruning"); ``hidden_dead_all`` pools them.

    Returns:
        dict of floats in [0, 1].
    """
    out: Dict[str, float] = {}
    items = masking.items()
    no_in, no_out = {}, {}
    for name, _, mask in items:
        mk = mask.reshape(mask.shape[0], mask.shape[1], -1)
        no_in[name] = (mk.sum(dim=(1, 2)) == 0)
        no_out[name] = (mk.sum(dim=(0, 2)) == 0)
        out[f"units_no_in/{name}"] = float(no_in[name].float().mean())
        out[f"units_no_out/{name}"] = float(no_out[name].float().mean())
    dead_total, units_total = 0, 0
    for (a, wa, _), (b, wb, _) in zip(items[:-1], items[1:]):
        if isinstance(masking.module(a), nn.Linear) and isinstance(masking.module(b), nn.Linear) \
                and wa.shape[0] == wb.shape[1]:
            dead = no_in[a] | no_out[b]
            out[f"hidden_dead/{a}"] = float(dead.float().mean())
            dead_total += int(dead.sum())
            units_total += dead.numel()
    if units_total:
        out["hidden_dead_all"] = dead_total / units_total
    return out


def _mask_row_values(masking: Masking) -> Dict[str, float]:
    """Per-layer densities and the neuron accounting as summary-row columns."""
    vals = {f"density/{n}": d for n, d in masking.layer_densities().items()}
    vals.update(neuron_accounting(masking))
    return vals


def _matching(masking: Masking, patterns) -> List[str]:
    return [n for n in masking.names if any(fnmatch.fnmatch(n, p) for p in patterns)]


# --------------------------------------------------------------------------- SNIP scores
def snip_scores(model: nn.Module, masking: Masking, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: int, batch_size: int,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Connection sensitivity ``|w * g|`` of every prunable weight (SNIP, Lee et al. 2019, eq. 6).

    ``g`` is the gradient of the mean loss over ``batches`` minibatches of ``batch_size`` samples
    drawn without replacement (seeded by ``generator``) from ``(x, y)``; the model is left unchanged
    (gradients are cleared). The normalisation of eq. 6 does not change a top-k and is omitted.

    Args:
        model: the network at initialisation.
        masking: names the prunable weights.
        x: ``(N, *)`` inputs; y: ``(N,)`` labels.
        loss_fn: ``(logits (B, C), labels (B,)) -> scalar``.

    Returns:
        ``{name: tensor of the weight's shape}`` (float32, >= 0).
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator)
    was = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    batches = max(1, min(batches, math.ceil(n / batch_size)))
    for b in range(batches):
        idx = perm[b * batch_size:(b + 1) * batch_size].to(x.device)
        loss = loss_fn(model(x[idx]), y[idx]) / batches
        loss.backward()
    scores = {name: (w.detach() * w.grad.detach()).abs().float() for name, w, _ in masking.items()}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return scores


def global_topk_masks(masking: Masking, scores: Dict[str, torch.Tensor], density: float,
                      dense: List[str] = ()) -> Dict[str, torch.Tensor]:
    """Keep the ``round(density * N)`` highest ``scores`` over all prunable layers (N = all their
    weights); layers named in ``dense`` stay fully dense and their weights count towards the budget.

    Raises:
        ConfigError: the dense layers alone exceed the budget.
    """
    total = sum(w.numel() for _, w, _ in masking.items())
    target = max(1, int(round(density * total)))
    fixed = sum(masking.weight(n).numel() for n in dense)
    if fixed > target:
        raise ConfigError(f"method.density={density}: the dense layers {dense} alone hold {fixed} weights, "
                          f"more than the budget of {target}")
    names = [n for n in masking.names if n not in dense]
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    keep = topk_mask(flat, target - fixed)
    out, i = {}, 0
    for n in masking.names:
        w = masking.weight(n)
        if n in dense:
            out[n] = torch.ones_like(w)
        else:
            out[n] = keep[i:i + w.numel()].view(w.shape).to(w.device)
            i += w.numel()
    return out


# --------------------------------------------------------------------------- random pruning
@dataclass
class RandomPruneConfig(MethodConfig):
    """``method=random_prune``: random masks at init under ``budget`` at global ``density``."""

    name: str = "random_prune"
    density: float = 0.1
    budget: str = "erk"  # uniform | uniform+ | er | erk | erk+ | snip_ratio | global
    dense: List[str] = field(default_factory=list)  # fnmatch patterns of layers kept dense (count to budget)
    erk_power_scale: float = 1.0
    snip_batches: int = 1  # snip_ratio: minibatches for the SNIP scores
    snip_batch_size: Optional[int] = None  # default: trainer.batch_size

    def __post_init__(self):
        check_density("method.density", self.density)
        _check(self.budget in BUDGETS, "method.budget", self.budget, f"unknown (allowed: {', '.join(BUDGETS.names())})")
        _check(self.erk_power_scale > 0, "method.erk_power_scale", self.erk_power_scale, "must be > 0")
        _check(self.snip_batches >= 1, "method.snip_batches", self.snip_batches, "must be >= 1")
        _check(self.snip_batch_size is None or self.snip_batch_size >= 1, "method.snip_batch_size",
               self.snip_batch_size, "must be >= 1 or null")


class PruneAtInit(Method):
    """Shared flow of pruning at initialisation: build the model, choose masks once (:meth:`init_masks`),
    log the per-layer densities and neuron accounting, train with the masks fixed; one summary row."""

    def init_masks(self, model, masking: Masking, trainer, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def row_extra(self) -> dict:
        return {}

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        trainer = ctx.trainer(model, masking)
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 7919)
        masking.set_masks(self.init_masks(model, masking, trainer, gen))
        init = _mask_row_values(masking)
        ctx.metrics.log(0, init)
        final = trainer.fit()
        return pd.DataFrame([self.row(**self.row_extra(), target_density=cfg.density, density=masking.density(),
                                      **final, **init)])


@METHODS.register("random_prune", schema=RandomPruneConfig)
class RandomPrune(PruneAtInit):
    """Random pruning at initialisation under a layer-wise budget, then training (mask fixed).

    Summary row: ``budget``, realised ``density``, ``target_density``, per-layer ``density/<layer>``,
    neuron accounting and the trainer's final metrics.
    """

    def init_masks(self, model, masking, trainer, gen):
        cfg = self.cfg
        scores = None
        if cfg.budget == "snip_ratio":
            scores = snip_scores(model, masking, trainer.data.train.x, trainer.data.train.y, trainer.loss_fn,
                                 cfg.snip_batches, cfg.snip_batch_size or self.ctx.cfg.trainer.batch_size, gen)
        counts = layer_counts(masking, cfg.density, cfg.budget, dense=list(cfg.dense), scores=scores,
                              erk_power_scale=cfg.erk_power_scale)
        return random_masks(masking, counts, gen)

    def row_extra(self) -> dict:
        return {"budget": self.cfg.budget}


# --------------------------------------------------------------------------- SNIP
@dataclass
class SnipConfig(MethodConfig):
    """``method=snip``: SNIP's global top-k of |w * g| at init (Lee et al. 2019)."""

    name: str = "snip"
    density: float = 0.1
    batches: int = 1  # minibatches over which the gradient is averaged (Lee et al. use one)
    batch_size: Optional[int] = None  # default: trainer.batch_size
    dense: List[str] = field(default_factory=list)  # fnmatch patterns of layers kept dense

    def __post_init__(self):
        check_density("method.density", self.density)
        _check(self.batches >= 1, "method.batches", self.batches, "must be >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, "method.batch_size", self.batch_size,
               "must be >= 1 or null")


@METHODS.register("snip", schema=SnipConfig)
class Snip(PruneAtInit):
    """SNIP: prune once at initialisation by connection sensitivity, then train with the mask fixed."""

    def init_masks(self, model, masking, trainer, gen):
        cfg = self.cfg
        scores = snip_scores(model, masking, trainer.data.train.x, trainer.data.train.y, trainer.loss_fn,
                             cfg.batches, cfg.batch_size or self.ctx.cfg.trainer.batch_size, gen)
        return global_topk_masks(masking, scores, cfg.density, _matching(masking, cfg.dense))


# --------------------------------------------------------------------------- randomized pruning (000)
PRUNE_STRATEGIES: Registry = Registry("method.strategies")


@PRUNE_STRATEGIES.register("none")
def _none(w: torch.Tensor, cfg, gen) -> torch.Tensor:
    """No pruning: all-ones mask."""
    return torch.ones_like(w)


@PRUNE_STRATEGIES.register("threshold")
def _threshold(w, cfg, gen):
    """Threshold fraction: prune the ``fraction`` of connections with the smallest |w|."""
    return topk_mask(w.abs(), w.numel() - _n_prune(w, cfg.fraction))


@PRUNE_STRATEGIES.register("random")
def _random(w, cfg, gen):
    """Random: prune a uniformly random ``fraction`` of the connections, regardless of |w|."""
    return topk_mask(torch.rand(w.shape, generator=gen), w.numel() - _n_prune(w, cfg.fraction))


@PRUNE_STRATEGIES.register("importance_random")
def _importance_random(w, cfg, gen):
    """Importance-weighted random: sample ``fraction`` of the connections to prune without replacement,
    with probability proportional to ``exp(-|w| / (temperature * mean|w|))`` (falls with |w|)."""
    a = w.detach().abs().reshape(-1).float().cpu()
    p = torch.exp(-a / (cfg.temperature * a.mean().clamp_min(1e-12)))
    idx = torch.multinomial(p, _n_prune(w, cfg.fraction), replacement=False, generator=gen)
    mask = torch.ones_like(a)
    mask[idx] = 0.0
    return mask.view(w.shape)


@PRUNE_STRATEGIES.register("fractional_threshold")
def _fractional_threshold(w, cfg, gen):
    """Fractional random threshold: the candidates are the ``fraction`` smallest-|w| connections;
    a random ``random_part`` of the candidates is pruned (so ``fraction * random_part`` in all)."""
    a = w.detach().abs().reshape(-1).float().cpu()
    n_cand = _n_prune(w, cfg.fraction)
    cand = torch.topk(-a, n_cand, sorted=False).indices
    chosen = cand[torch.randperm(n_cand, generator=gen)[:int(round(cfg.random_part * n_cand))]]
    mask = torch.ones_like(a)
    mask[chosen] = 0.0
    return mask.view(w.shape)


def _n_prune(w: torch.Tensor, fraction: float) -> int:
    return int(round(fraction * w.numel()))


@dataclass
class RandomizedPruneConfig(MethodConfig):
    """``method=randomized_prune``: document 000's pruning strategies on one layer after training."""

    name: str = "randomized_prune"
    layer: str = "layers.2.weight"  # fnmatch pattern that must match exactly one prunable layer
    fraction: float = 0.5  # share of the layer's connections pruned (fractional_threshold: candidates)
    random_part: float = 0.5  # fractional_threshold: share of the candidates pruned
    temperature: float = 1.0  # importance_random: p(prune) ~ exp(-|w| / (temperature * mean|w|))
    draws: int = 5  # random masks per strategy (mean and std reported)
    strategies: List[str] = field(default_factory=lambda: ["none", "threshold", "random", "importance_random",
                                                           "fractional_threshold"])

    def __post_init__(self):
        check_fraction("method.fraction", self.fraction)
        check_fraction("method.random_part", self.random_part, closed_right=True)
        _check(self.temperature > 0, "method.temperature", self.temperature, "must be > 0")
        _check(self.draws >= 1, "method.draws", self.draws, "must be >= 1")
        for s in self.strategies:
            _check(s in PRUNE_STRATEGIES, "method.strategies", s,
                   f"unknown strategy (allowed: {', '.join(PRUNE_STRATEGIES.names())})")


@METHODS.register("randomized_prune", schema=RandomizedPruneConfig)
class RandomizedPrune(Method):
    """Train densely once, then for every strategy prune ``method.layer`` of a copy and evaluate.

    One row per strategy with mean/std over ``draws`` random masks of ``test_acc``, ``val_acc``,
    ``test_loss`` and the number of connections pruned.

    Raises:
        ConfigError: ``method.layer`` matches no or several prunable layers.
    """

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        layers = _matching(masking, [cfg.layer])
        if len(layers) != 1:
            raise ConfigError(f"method.layer={cfg.layer!r}: matches {layers or 'no layer'} "
                              f"(prunable: {', '.join(masking.names)})")
        layer = layers[0]
        trainer = ctx.trainer(model, masking)
        dense = trainer.fit()
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed) + 104729)
        rows = []
        for strategy in cfg.strategies:
            fn = PRUNE_STRATEGIES.get(strategy)
            draws = 1 if strategy in ("none", "threshold") else cfg.draws
            res = []
            for _ in range(draws):
                model.load_state_dict(trained)
                w = masking.weight(layer)
                masking.set_mask(layer, fn(w.detach().cpu(), cfg, gen).to(w.device))
                ev = {f"test_{k}": v for k, v in trainer.evaluate(trainer.data.test).items()}
                ev.update({f"val_{k}": v for k, v in trainer.evaluate(trainer.data.val).items()})
                ev["pruned"] = int(w.numel() - masking.mask(layer).count_nonzero())
                res.append(ev)
            df = pd.DataFrame(res)
            vals = {k: float(df[k].mean()) for k in df.columns}
            vals.update({f"{k}_std": float(df[k].std(ddof=1)) if len(df) > 1 else 0.0 for k in ("test_acc",)})
            rows.append(self.row(strategy=strategy, layer=layer, fraction=cfg.fraction, draws=draws,
                                 layer_size=int(w.numel()), dense_test_acc=dense["test_acc"], **vals))
            ctx.metrics.log(trainer.step, {f"{strategy}/test_acc": vals["test_acc"]})
        model.load_state_dict(trained)
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- IMP with neuron accounting
@dataclass
class ImpNeuronsConfig(LthImpConfig):
    """``method=lth_imp_neurons``: the keys of ``lth_imp``."""

    name: str = "lth_imp_neurons"


class _RecordingContext:
    """Delegates to a :class:`~sparsebench.methods.base.RunContext`; remembers the first Masking made."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.first_masking: Optional[Masking] = None

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def masking(self, model):
        m = self._ctx.masking(model)
        if self.first_masking is None:
            self.first_masking = m
        return m


@METHODS.register("lth_imp_neurons", schema=ImpNeuronsConfig)
class ImpWithNeuronAccounting(LotteryTicketIMP):
    """``lth_imp`` whose every round row (and metrics log, ``round<r>/hidden_dead/<layer>``) also
    holds per-layer densities and the neuron accounting of :func:`neuron_accounting` (document 003,
    "neuron pruning" at ~13% density)."""

    def __init__(self, ctx):
        super().__init__(_RecordingContext(ctx))

    def row(self, **values) -> dict:
        r = super().row(**values)
        masking = self.ctx.first_masking
        if masking is not None and "round" in values:
            acc = _mask_row_values(masking)
            r.update(acc)
            self.ctx.metrics.log(int(values.get("steps", 0)),
                                 {f"round{values['round']}/{k}": v for k, v in acc.items()})
        return r
