"""ISS, image shortcut squeezing (Liu et al. 2023), as APBench runs it: compress every training
image once before standard training, so low-magnitude shortcuts do not survive.

- `iss_jpeg`: JPEG at quality 10 (APBench's `--jpeg`).
- `iss_gray`: grayscale (ITU-R 601 luma, replicated over the channels; APBench's `--gray`). On grey
  datasets it is the identity, kept so one sweep covers colour and grey data.
- `iss_bdr`: bit-depth reduction to 2 bits (APBench's `--bdr`, torchvision RandomPosterize(bits=2, p=1)).

The transforms are deterministic, so they are applied once to the whole training split (the test
split stays clean, as in APBench) and the transformed split's fingerprint joins the checkpoint key.
JPEG uses the real codec (Pillow/libjpeg), batched: images are edge-padded to whole JPEG blocks
and tiled into one large picture per chunk, so each image is coded exactly as alone (bit-identical
for grey images; for colour the chroma upsampling may differ at tile borders).
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harness.core.defense import BuildContext, Defense, register
from defenses.standard import train_defended
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.data.training import TrainConfig


def jpeg_u8(x: torch.Tensor, quality: int, chunk: int = 4096) -> torch.Tensor:
    """JPEG-code uint8 NCHW images (C = 1 or 3) at `quality` with Pillow, tiled; returns uint8 NCHW."""
    from PIL import Image

    n, c, h, w = x.shape
    if c not in (1, 3):
        raise UserError(f"iss_jpeg needs 1- or 3-channel images, got {c} channels")
    block = 8 if c == 1 else 16  # 4:2:0 chroma subsampling codes 16 x 16 units
    ph, pw = math.ceil(h / block) * block, math.ceil(w / block) * block
    out = torch.empty_like(x)
    for start in range(0, n, chunk):  # chunks of images, each one codec call
        xb = x[start:start + chunk]
        m = len(xb)
        padded = F.pad(xb.float(), (0, pw - w, 0, ph - h), mode="replicate").to(torch.uint8) if (ph, pw) != (h, w) else xb
        side = math.ceil(math.sqrt(m))
        grid = torch.zeros(side * side, c, ph, pw, dtype=torch.uint8)
        grid[:m] = padded
        mosaic = grid.view(side, side, c, ph, pw).permute(0, 3, 1, 4, 2).reshape(side * ph, side * pw, c)
        arr = mosaic.numpy()
        img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.array(Image.open(buf).convert("L" if c == 1 else "RGB"), copy=True)
        dec_t = torch.from_numpy(dec).view(side * ph, side * pw, c)
        tiles = dec_t.view(side, ph, side, pw, c).permute(0, 2, 4, 1, 3).reshape(side * side, c, ph, pw)
        out[start:start + m] = tiles[:m, :, :h, :w]
    return out


def gray_u8(x: torch.Tensor) -> torch.Tensor:
    """Luma (0.299 R + 0.587 G + 0.114 B, as Pillow's "L"), replicated over the channels; grey input unchanged."""
    if x.shape[1] == 1:
        return x.clone()
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    luma = ((x.to(torch.int32) * weights).sum(dim=1, keepdim=True) + 500) // 1000
    return luma.clamp(0, 255).to(torch.uint8).expand(-1, x.shape[1], -1, -1).contiguous()


def bdr_u8(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the `bits` most significant bits of every value (posterize)."""
    mask = (0xFF << (8 - int(bits))) & 0xFF
    return x & mask


class _Squeeze(Defense):
    """Shared implementation: transform the training split once, then standard training."""

    kind: ClassVar[str] = ""

    def __init__(self, train: dict[str, Any] | None = None) -> None:
        self.train = dict(train or {})

    def transform(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> Classifier:
        data = ctx.data
        if data.train_x is None:
            raise UserError(f"defense {self.name!r} needs a training split; dataset {data.name!r} has none")
        squeezed = data.with_train(self.transform(data.train_x), data.train_y, squeezed=self.name)
        module, facts = train_defended(dataclasses.replace(ctx, data=squeezed), self,
                                       train_cfg=TrainConfig.from_dict(self.train))
        changed = float((squeezed.train_x != data.train_x).float().mean())
        facts = {**facts, "iss": {"transform": self.name, "changed_values": round(changed, 4)}}
        return Classifier(module, data.num_classes, data.input_shape, info=facts)


@register("iss_jpeg")
class ISSJpeg(_Squeeze):
    """JPEG-compress the training images (quality 10 in ISS/APBench)."""

    def __init__(self, quality: int = 10, train: dict[str, Any] | None = None) -> None:
        if not 1 <= int(quality) <= 100:
            raise UserError(f"defense.quality={quality} must be in 1..100 (10 in ISS)")
        super().__init__(train)
        self.quality = int(quality)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return jpeg_u8(x, self.quality)


@register("iss_gray")
class ISSGray(_Squeeze):
    """Grayscale the training images (the identity on grey datasets)."""

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return gray_u8(x)


@register("iss_bdr")
class ISSBdr(_Squeeze):
    """Reduce the training images' bit depth (2 bits in ISS/APBench)."""

    def __init__(self, bits: int = 2, train: dict[str, Any] | None = None) -> None:
        if not 1 <= int(bits) <= 8:
            raise UserError(f"defense.bits={bits} must be in 1..8 (2 in ISS)")
        super().__init__(train)
        self.bits = int(bits)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return bdr_u8(x, self.bits)
