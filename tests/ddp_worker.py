"""Worker for tests/test_ddp.py, launched by torchrun with 2 CPU processes (gloo).

Trains a masked MLP on Digits with a callback that changes masks from *rank-local* randomness (as a
dynamic-sparse update driven by rank-local activations would); the trainer must broadcast rank 0's
masks so that all ranks end identical. Each rank saves its final state to <out>/rank<r>.pt. ``python ddp_worker.py OUT faiss_grow`` runs the real
DST updater with faiss_grow instead.
"""
import sys

import torch

from sparsebench.config import DatasetConfig, TrainerConfig
from sparsebench.data import load_dataset
from sparsebench.core.distributed import rank
from sparsebench.sparsity.masking import Masking
from sparsebench.sparsity.selection import magnitude_masks, topk_mask
from sparsebench.models import MLP
from sparsebench.core.seeding import set_seed
from sparsebench.training.callbacks import Callback
from sparsebench.training.runtime import setup_run
from sparsebench.training.trainer import Trainer


class RankLocalRegrow(Callback):
    def on_step_end(self, trainer):
        if trainer.step % 20:
            return
        g = torch.Generator().manual_seed(1000 * trainer.step + rank())  # differs between ranks
        for name, w, m in trainer.masking.items():
            k = int(m.sum())
            trainer.masking.set_mask(name, topk_mask(torch.rand(m.shape, generator=g), k))


def main(out, mode="regrow"):
    set_seed(0)
    data = load_dataset(DatasetConfig(name="digits"), seed=0)
    model = MLP(64, 10, [32])
    masking = Masking(model)
    masking.set_masks(magnitude_masks(masking, {n: 0.5 for n in masking.names}))
    cfg = TrainerConfig(epochs=4, batch_size=64, lr=0.05, device="cpu")
    device = setup_run(cfg)  # joins the gloo process group (torchrun sets WORLD_SIZE=2)
    if mode == "faiss_grow":  # the real DST update, growth chosen from rank-local captured activations
        from sparsebench.dst.grow import GROW_CRITERIA
        from sparsebench.dst.updater import DSTUpdater

        grow = GROW_CRITERIA.get("similarity")(torch.Generator().manual_seed(0), metric="abs_ip", search="faiss")
        callbacks = [DSTUpdater(masking, grow, d0=0.3, schedule="constant", delta_t=10, t_end=1.0)]
    else:
        callbacks = [RankLocalRegrow()]
    trainer = Trainer(cfg, model, data, device, masking=masking, callbacks=callbacks, seed=0)
    final = trainer.fit()
    torch.save({"state": model.state_dict(), "final": final, "world": trainer.world}, f"{out}/rank{trainer.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
