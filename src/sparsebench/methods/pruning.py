"""Magnitude pruning after training and lottery-ticket iterative magnitude pruning (IMP).

* ``magnitude``: train dense, prune to ``density`` by |w| (layer-wise or global), evaluate, optionally
  fine-tune with the mask fixed (Han et al. 2015).
* ``lth_imp``: Frankle & Carbin 2019 (ICLR), "The Lottery Ticket Hypothesis": train, prune the
  ``prune_rate`` smallest-|w| fraction of each layer's remaining weights (``prune_rate_output`` for
  the output layer), rewind the survivors to their values at step ``rewind_step`` (0 = the initial
  weights, theta_0), repeat for ``rounds``. With ``target_density`` set, every layer keeps
  ``target_density ** (1 / rounds)`` of its remaining weights per round, so after ``rounds`` rounds it
  sits at ``target_density`` (the p^(1/n) schedule of Algorithm 1 in document 003). Optional control
  ``reinit_control``: the same masks with a fresh random initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import pandas as pd
import torch
from omegaconf import OmegaConf

from sparsebench.config import MethodConfig, _check, check_density, check_fraction
from sparsebench.sparsity.masking import Masking, global_magnitude_masks, magnitude_masks, num_to_keep
from sparsebench.training.trainer import Callback
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method


# --------------------------------------------------------------------------- magnitude
@dataclass
class MagnitudeConfig(MethodConfig):
    name: str = "magnitude"
    density: float = 0.1
    scope: str = "layerwise"  # layerwise | global
    finetune_epochs: int = 0

    def __post_init__(self):
        check_density("method.density", self.density)
        _check(self.scope in ("layerwise", "global"), "method.scope", self.scope, "unknown (allowed: layerwise, global)")
        _check(self.finetune_epochs >= 0, "method.finetune_epochs", self.finetune_epochs, "must be >= 0")


def prune_masks(masking: Masking, density: float, scope: str) -> Dict[str, torch.Tensor]:
    """Masks at ``density`` by magnitude among currently active weights, layer-wise or global."""
    if scope == "global":
        return global_magnitude_masks(masking, density)
    return magnitude_masks(masking, {n: density for n in masking.names})


@METHODS.register("magnitude", schema=MagnitudeConfig)
class MagnitudePruning(Method):
    """One-shot magnitude pruning after dense training."""

    def run(self) -> pd.DataFrame:
        ctx = self.ctx
        model = ctx.new_model()
        masking = ctx.masking(model)
        trainer = ctx.trainer(model, masking, prefix="dense/")
        dense = trainer.fit()
        rows = [self.row(stage="dense", density=1.0, **dense)]
        masking.set_masks(prune_masks(masking, self.cfg.density, self.cfg.scope))
        pruned = {f"val_{k}": v for k, v in trainer.evaluate(trainer.data.val).items()}
        pruned.update({f"test_{k}": v for k, v in trainer.evaluate(trainer.data.test).items()})
        rows.append(self.row(stage="pruned", density=masking.density(), **pruned))
        if self.cfg.finetune_epochs:
            ft_cfg = OmegaConf.merge(ctx.cfg.trainer, {"epochs": self.cfg.finetune_epochs, "iterations": None})
            ft = ctx.trainer(model, masking, prefix="finetune/", seed_offset=1, trainer_cfg=ft_cfg).fit()
            rows.append(self.row(stage="finetuned", density=masking.density(), **ft))
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- LTH IMP
@dataclass
class LthImpConfig(MethodConfig):
    name: str = "lth_imp"
    rounds: int = 5
    prune_rate: float = 0.2  # fraction of remaining weights pruned per round, hidden layers
    prune_rate_output: float = 0.1  # the same for the output layer
    target_density: Optional[float] = None  # set: every layer keeps target_density**(1/rounds) per round
    rewind_step: int = 0  # k: rewind to the weights after k training steps (0 = initialisation)
    scope: str = "layerwise"  # layerwise | global (global uses prune_rate for the whole network)
    reinit_control: bool = False  # also train each ticket from a fresh random init (the control)

    def __post_init__(self):
        _check(self.rounds >= 1, "method.rounds", self.rounds, "must be >= 1")
        check_fraction("method.prune_rate", self.prune_rate)
        check_fraction("method.prune_rate_output", self.prune_rate_output)
        if self.target_density is not None:
            check_density("method.target_density", self.target_density)
        _check(self.rewind_step >= 0, "method.rewind_step", self.rewind_step, "must be >= 0")
        _check(self.scope in ("layerwise", "global"), "method.scope", self.scope, "unknown (allowed: layerwise, global)")


class RewindCapture(Callback):
    """Stores a copy of the model's parameters and buffers (masks excluded) at step ``k``."""

    def __init__(self, k: int):
        self.k = k
        self.weights: Optional[Dict[str, torch.Tensor]] = None

    def _capture(self, trainer) -> None:
        self.weights = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()
                        if not n.endswith("weight_mask")}

    def on_train_start(self, trainer) -> None:
        if self.k == trainer.step:
            self._capture(trainer)

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]

    def on_step_end(self, trainer) -> None:
        if self.weights is None and trainer.step == self.k:
            self._capture(trainer)


def rewind(model: torch.nn.Module, masking: Masking, weights: Dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (masks excluded) into ``model`` and zero the pruned positions."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(m.endswith("weight_mask") for m in missing), (missing, unexpected)
    masking.apply_()


def imp_round_densities(masking: Masking, cfg: LthImpConfig) -> Dict[str, float]:
    """Per-layer target densities (of the full layer) after one more IMP round."""
    out = {}
    for name, (active, total) in masking.counts().items():
        if cfg.target_density is not None:
            keep = cfg.target_density ** (1.0 / cfg.rounds)
        else:
            keep = 1.0 - (cfg.prune_rate_output if name == masking.output_layer else cfg.prune_rate)
        out[name] = num_to_keep(active, keep) / total
    return out


@METHODS.register("lth_imp", schema=LthImpConfig)
class LotteryTicketIMP(Method):
    """Iterative magnitude pruning with rewinding; one summary row per round (round 0 = dense)."""

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        capture = RewindCapture(cfg.rewind_step)
        rows, first = [], 0
        saved = self.ctx.load_state("lth_state")
        if saved is not None:  # resume after the last finished round
            rows, first = saved["rows"], saved["round"] + 1
            capture.weights = saved["rewind"]
            model.load_state_dict(saved["model"])
            model.to(ctx.device)
        for rnd in range(first, cfg.rounds + 1):
            if rnd > 0:
                if cfg.scope == "global":
                    keep = (cfg.target_density ** (1.0 / cfg.rounds) if cfg.target_density is not None
                            else 1.0 - cfg.prune_rate)
                    masks = global_magnitude_masks(masking, masking.density() * keep)
                else:
                    masks = magnitude_masks(masking, imp_round_densities(masking, cfg))
                masking.set_masks(masks)
                rewind(model, masking, capture.weights)
            start = cfg.rewind_step if rnd > 0 else 0
            trainer = ctx.trainer(model, masking, callbacks=[capture] if rnd == 0 else [],
                                  prefix=f"round{rnd}/", start_step=start)
            final = trainer.fit()
            dead = masking.dead_units()
            row = self.row(round=rnd, density=masking.density(), **final,
                           dead_units=sum(d["no_incoming"] for n, d in dead.items() if n != masking.output_layer))
            if cfg.reinit_control and rnd > 0:
                row.update(self._reinit_control(masking.masks(), rnd))
            rows.append(row)
            ctx.metrics.log(trainer.step, {f"round{rnd}/density": row["density"]})
            print(f"  round {rnd:2d}  density {row['density']:.4f}  test_acc {row['test_acc']:.4f}", flush=True)
            self.ctx.save_state("lth_state", {"round": rnd, "rows": rows, "rewind": capture.weights,
                                              "model": model.state_dict()})
        return pd.DataFrame(rows)

    def _reinit_control(self, masks: Dict[str, torch.Tensor], rnd: int) -> Dict[str, float]:
        model = self.ctx.new_model(seed_offset=1000 + rnd)
        masking = self.ctx.masking(model)
        masking.set_masks({n: m.to(masking.mask(n).device) for n, m in masks.items()})
        final = self.ctx.trainer(model, masking, prefix=f"reinit{rnd}/").fit()
        return {"reinit_test_acc": final["test_acc"], "reinit_val_acc": final["val_acc"]}
