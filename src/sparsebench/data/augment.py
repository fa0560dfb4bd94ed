"""Batch data augmentation on the training device: random crop, horizontal flip and cutout.

The whole batch is augmented at once with tensor ops on the device that holds it (no per-image
Python loop, no DataLoader workers): the approach of airbench (Jordan 2024, "94% on CIFAR-10 in
3.29 seconds on a single GPU"), applied to the in-memory :class:`~sparsebench.data.Split` tensors.

Strategies (``dataset.augment``; registry :data:`AUGMENTATIONS`):

* ``none``: the identity (default; the MNIST family and tabular data).
* ``crop_flip``: zero-pad every side by ``dataset.augment_pad`` pixels (default 4), take a random
  ``H x W`` crop (offsets uniform in ``[0, 2 * pad]`` per image and axis), then flip horizontally
  with probability 1/2. The standard CIFAR recipe of WideResNets (Zagoruyko & Komodakis 2016,
  Sec. 4, after He et al. 2016). The images are already normalised, so the padding is the mean colour.
* ``crop_flip_cutout``: ``crop_flip``, then zero one ``cutout x cutout`` square per image (DeVries &
  Taylor 2017, "Improved Regularization of CNNs with Cutout": centre uniform over the image, the
  square clipped at the border; their CIFAR-100 size is 8, the default of ``dataset.cutout``).

Randomness comes only from the ``torch.Generator`` passed in (on the batch's device), drawn in a
fixed order (crop offsets, flips, cutout centres), so a run with the same seed draws the same
augmentations, and the trainer checkpoints that generator's state so a resumed run draws exactly
the crops the uninterrupted run would have. Augmentation is applied to training batches only;
evaluation never sees it (the trainer calls it in its training loop, not in ``evaluate``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry
from sparsebench.core.seeding import derive_seed

AUGMENTATIONS: Registry = Registry("dataset.augment")

# The augmentation generator is seeded with ``derive_seed(seed, "augment")`` so its stream differs from
# the data-order generator (seeded with ``seed``) that shares the same algorithm on the CPU.


class Augmentation:
    """Base class: ``aug(x, generator)`` returns the augmented batch (a new tensor; ``x`` is unchanged).

    Args of ``__call__``:
        x: images ``(N, C, H, W)`` on any device (float, normalised).
        generator: a ``torch.Generator`` on ``x.device``; the only source of randomness.

    Raises:
        ConfigError: ``x`` is not a 4-D image batch (e.g. tabular data).
    """

    name = "none"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x

    @staticmethod
    def _check_images(x: torch.Tensor, name: str) -> None:
        if x.dim() != 4:
            raise ConfigError(f"dataset.augment={name!r}: needs image batches (N, C, H, W), got shape "
                              f"{tuple(x.shape)} (use dataset.augment=none for tabular data)")


@AUGMENTATIONS.register("none", images_only=False)
class NoAugment(Augmentation):
    """The identity (no random numbers are drawn)."""


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` on every side and crop each image back to ``(H, W)`` at a random offset.

    Args:
        x: ``(N, C, H, W)``. pad: pixels (>= 0). generator: on ``x.device``.

    Returns:
        ``(N, C, H, W)``; image ``n`` is ``padded[n, :, dy:dy + H, dx:dx + W]`` with ``dy, dx`` uniform
        in ``[0, 2 * pad]`` (``pad = 0``: ``x`` itself, no numbers drawn).
    """
    if pad == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=x.device)
    rows = (off[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)  # (N, 1, H, 1)
    cols = (off[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``(N, C, H, W)`` along its width with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one ``size x size`` square per image, centre uniform over ``(H, W)``, clipped at the border."""
    n, _, h, w = x.shape
    centre = torch.rand(n, 2, generator=generator, device=x.device)
    cy = (centre[:, 0] * h).long().view(n, 1, 1)
    cx = (centre[:, 1] * w).long().view(n, 1, 1)
    y0, x0 = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device).view(1, h, 1)
    col = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (r >= y0) & (r < y0 + size) & (col >= x0) & (col < x0 + size)  # (N, H, W)
    return x.masked_fill(hole.unsqueeze(1), 0.0)


@AUGMENTATIONS.register("crop_flip", images_only=True)
class CropFlip(Augmentation):
    """Random crop of the ``pad``-padded image, then a random horizontal flip (the WRN CIFAR recipe)."""

    name = "crop_flip"

    def __init__(self, pad: int = 4, cutout: int = 0):  # cutout: unused here (one constructor for all)
        if pad < 0:
            raise ConfigError(f"dataset.augment_pad={pad!r}: must be >= 0")
        self.pad = int(pad)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self._check_images(x, self.name)
        return random_flip(random_crop(x, self.pad, generator), generator)



@AUGMENTATIONS.register("crop_flip_cutout", images_only=True)
class CropFlipCutout(CropFlip):
    """``crop_flip`` followed by one cutout square of side ``cutout`` per image."""

    name = "crop_flip_cutout"

    def __init__(self, pad: int = 4, cutout: int = 8):
        super().__init__(pad)
        if cutout < 1:
            raise ConfigError(f"dataset.cutout={cutout!r}: must be >= 1 with dataset.augment=crop_flip_cutout")
        self.size = int(cutout)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return cutout(super().__call__(x, generator), self.size, generator)


def build_augmentation(dataset_cfg) -> Optional[Augmentation]:
    """The augmentation of a ``dataset`` config, or None for ``none`` (the trainer then draws nothing).

    Args:
        dataset_cfg: has ``augment`` (a :data:`AUGMENTATIONS` name), ``augment_pad`` and ``cutout``.

    Raises:
        ConfigError: unknown name (lists the allowed ones) or an invalid size.
    """
    name = str(getattr(dataset_cfg, "augment", "none"))
    cls = AUGMENTATIONS.get(name)
    if cls is NoAugment:
        return None
    return cls(pad=int(dataset_cfg.augment_pad), cutout=int(dataset_cfg.cutout))


def check_augment(groups: dict) -> None:
    """Cross-check for config validation (:func:`sparsebench.api.validate`): an image augmentation
    (registry metadata ``images_only``) on a tabular dataset is an error.

    Args:
        groups: ``{group: validated dataclass}``; reads ``groups["dataset"]``.

    Raises:
        ConfigError: unknown ``dataset.augment`` (lists the allowed names), or image-only on tabular data.
    """
    from sparsebench.data.registry import DATASETS

    ds = groups["dataset"]
    if AUGMENTATIONS.meta(ds.augment).get("images_only") and DATASETS.meta(ds.name).get("kind") == "tabular":
        raise ConfigError(f"dataset.augment={ds.augment!r}: augments images; dataset={ds.name} is tabular "
                          f"(use dataset.augment=none)")


def augment_generator(seed: int, device) -> torch.Generator:
    """The generator the trainer draws augmentations from: on ``device``, seeded with
    ``derive_seed(seed, "augment")``; its ``get_state()`` goes into the training checkpoint."""
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, "augment"))
