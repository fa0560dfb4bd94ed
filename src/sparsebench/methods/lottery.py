"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding.

* ``lth_imp``: Frankle & Carbin 2019 (ICLR), "The Lottery Ticket Hypothesis": train, prune the
  ``prune_rate`` smallest-|w| fraction of each layer's remaining weights (``prune_rate_output`` for
  the output layer), rewind the survivors to their values at step ``rewind_step`` (0 = the initial
  weights, theta_0), repeat for ``rounds``. With ``target_density`` set, every layer keeps
  ``target_density ** (1 / rounds)`` of its remaining weights per round, so after ``rounds`` rounds it
  sits at ``target_density`` (the p^(1/n) schedule of Algorithm 1 in document 003). ``scope=global``
  ranks all layers together (one rate for the whole network). Optional control ``reinit_control``: the
  same masks with a fresh random initialisation.
* ``lth_imp_neurons``: ``lth_imp`` whose round rows and metrics log also carry the per-layer densities
  and the neuron accounting of :func:`~sparsebench.sparsity.masking.neuron_accounting` (T003-neurons).

Every round trains through the shared trainer with its own checkpoint, and the IMP state is saved
after each round, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

import pandas as pd
import torch

from sparsebench.config import MethodConfig, check, check_density, check_fraction
from sparsebench.core.progress import Progress
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method
from sparsebench.sparsity.masking import Masking, mask_statistics
from sparsebench.sparsity.selection import SCOPES, magnitude_masks, num_to_keep
from sparsebench.training.callbacks import Callback


@dataclass
class LthImpConfig(MethodConfig):
    name: str = "lth_imp"
    rounds: int = 5
    prune_rate: float = 0.2  # fraction of remaining weights pruned per round, hidden layers
    prune_rate_output: float = 0.1  # the same for the output layer
    target_density: Optional[float] = None  # set: every layer keeps target_density**(1/rounds) per round
    rewind_step: int = 0  # k: rewind to the weights after k training steps (0 = initialisation)
    scope: str = "layer"  # layer | global (global uses prune_rate for the whole network)
    reinit_control: bool = False  # also train each ticket from a fresh random init (the control)

    def __post_init__(self):
        check(self.rounds >= 1, "method.rounds", self.rounds, "must be >= 1")
        check_fraction("method.prune_rate", self.prune_rate)
        check_fraction("method.prune_rate_output", self.prune_rate_output)
        if self.target_density is not None:
            check_density("method.target_density", self.target_density)
        check(self.rewind_step >= 0, "method.rewind_step", self.rewind_step, "must be >= 0")
        SCOPES.get(self.scope)


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
    """Per-layer target densities (of the full layer) after one more layer-wise IMP round:
    ``num_to_keep(active_l, keep_l) / numel_l`` with ``keep_l = target_density ** (1 / rounds)``, or
    ``1 - prune_rate`` (``1 - prune_rate_output`` for the output layer)."""
    out = {}
    for name, (active, total) in masking.counts().items():
        if cfg.target_density is not None:
            keep = cfg.target_density ** (1.0 / cfg.rounds)
        else:
            keep = 1.0 - (cfg.prune_rate_output if name == masking.output_layer else cfg.prune_rate)
        out[name] = num_to_keep(active, keep) / total
    return out


def imp_round_target(masking: Masking, cfg: LthImpConfig) -> Union[float, Dict[str, float]]:
    """The density after one more IMP round in ``cfg.scope``: per layer (:func:`imp_round_densities`)
    or, for a global scope, the current global density times ``target_density ** (1 / rounds)`` (or
    ``1 - prune_rate``)."""
    if SCOPES.get(cfg.scope).per_layer:
        return imp_round_densities(masking, cfg)
    keep = cfg.target_density ** (1.0 / cfg.rounds) if cfg.target_density is not None else 1.0 - cfg.prune_rate
    return masking.density() * keep


@METHODS.register("lth_imp", schema=LthImpConfig)
class LotteryTicketIMP(Method):
    """Iterative magnitude pruning with rewinding; one summary row per round (round 0 = dense)."""

    def round_extra(self, masking: Masking, rnd: int, final: dict) -> dict:
        """Extra columns of round ``rnd``'s row (``final``: the trainer's final metrics); none here."""
        return {}

    def run(self) -> pd.DataFrame:
        ctx, cfg = self.ctx, self.cfg
        model = ctx.new_model()
        masking = ctx.masking(model)
        capture = RewindCapture(cfg.rewind_step)
        rows, first = [], 0
        saved = ctx.load_state("lth_state")
        if saved is not None:  # resume after the last finished round
            rows, first = saved["rows"], saved["round"] + 1
            capture.weights = saved["rewind"]
            model.load_state_dict(saved["model"])
            model.to(ctx.device)
        progress = Progress(cfg.rounds + 1, "IMP rounds", ctx.cfg.trainer.progress, unit="round", initial=first,
                            say=lambda line: print(line, flush=True))
        for rnd in range(first, cfg.rounds + 1):
            progress.start(f"round {rnd}")
            if rnd > 0:
                masking.set_masks(magnitude_masks(masking, imp_round_target(masking, cfg), scope=cfg.scope))
                rewind(model, masking, capture.weights)
            start = cfg.rewind_step if rnd > 0 else 0
            trainer = ctx.trainer(model, masking, callbacks=[capture] if rnd == 0 else [],
                                  prefix=f"round{rnd}/", start_step=start)
            final = trainer.fit()
            dead = masking.dead_units()
            row = self.row(round=rnd, density=masking.density(), **final,
                           dead_units=sum(d["no_incoming"] for n, d in dead.items() if n != masking.output_layer))
            row.update(self.round_extra(masking, rnd, final))
            if cfg.reinit_control and rnd > 0:
                row.update(self._reinit_control(masking.masks(), rnd))
            rows.append(row)
            ctx.metrics.log(trainer.step, {f"round{rnd}/density": row["density"]})
            ctx.save_state("lth_state", {"round": rnd, "rows": rows, "rewind": capture.weights,
                                         "model": model.state_dict()})
            progress.done(f"  round {rnd:2d}  density {row['density']:.4f}  test_acc {row['test_acc']:.4f}")
        progress.close()
        return pd.DataFrame(rows)

    def _reinit_control(self, masks: Dict[str, torch.Tensor], rnd: int) -> Dict[str, float]:
        model = self.ctx.new_model(seed_name=f"reinit/round{rnd}")
        masking = self.ctx.masking(model)
        masking.set_masks({n: m.to(masking.mask(n).device) for n, m in masks.items()})
        final = self.ctx.trainer(model, masking, prefix=f"reinit{rnd}/").fit()
        return {"reinit_test_acc": final["test_acc"], "reinit_val_acc": final["val_acc"]}


# --------------------------------------------------------------------------- IMP with neuron accounting
@dataclass
class ImpNeuronsConfig(LthImpConfig):
    """``method=lth_imp_neurons``: the keys of ``lth_imp``."""

    name: str = "lth_imp_neurons"


@METHODS.register("lth_imp_neurons", schema=ImpNeuronsConfig)
class ImpWithNeuronAccounting(LotteryTicketIMP):
    """``lth_imp`` whose every round row (and metrics log, ``round<r>/hidden_dead/<layer>`` at the round's
    last step) also holds per-layer densities and the neuron accounting (document 003, "neuron
    pruning" at ~13% density)."""

    def round_extra(self, masking: Masking, rnd: int, final: dict) -> dict:
        acc = mask_statistics(masking)
        self.ctx.metrics.log(int(final.get("steps", 0)), {f"round{rnd}/{k}": v for k, v in acc.items()})
        return acc
