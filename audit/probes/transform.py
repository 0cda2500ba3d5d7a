"""``probes.transform``: bring probe photos of any size to the one size a model takes.

A probe folder of real photos holds images of many sizes and aspect ratios. A
:class:`ProbeTransform` brings each one to ``size`` (height, width) the way image
classifiers are usually evaluated: scale it so that it covers ``size`` (for a square
target, its shorter side becomes the side), then cut out the centre. It runs on the
decoded pixels in display space (float32 in ``[0, 1]``, 16-bit values kept), right
after a file is decoded, so the probe set the audit sees, and its digest, are the
transformed images. Model normalization is not its business: it stays in the model
config (``model.normalization``, the ``Normalized`` wrapper).

The documented choices:

* **Crop first, then resize.** The centre region of the image with the target's aspect
  ratio (``h`` by ``round(h * W / H)`` pixels, or ``round(w * H / W)`` by ``w``) is cut
  out, then resized to ``H x W``. This is the same picture as resizing the shorter side
  and cropping the centre, but the intermediate image is never larger than the file or
  the target: a hostile 1 x 4096 image aimed at 224 x 224 costs one pixel, not a
  224 x 917,504 intermediate.
* **Images: antialiased bilinear** (``torch.nn.functional.interpolate(..., antialias=True)``,
  what torchvision's ``Resize`` does by default), or antialiased bicubic on request
  (timm's usual choice); the result is clamped to ``[0, 1]`` (bicubic overshoots).
* **Masks: nearest neighbour at pixel centres** (``nearest-exact``) on the same crop,
  so a mask stays on its object: a pixel of the output is the object exactly when the
  source pixel under its centre is.
* An image already ``H x W`` is not touched (bit for bit the untransformed pixels).

Centre offsets round down: ``top = (h - crop_h) // 2``, ``left = (w - crop_w) // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["INTERPOLATIONS", "ProbeTransform", "probe_transform"]

#: The resampling a :class:`ProbeTransform` may use for images (masks: nearest neighbour).
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ProbeTransform:
    """Scale an image to cover ``size`` and cut out its centre (see the module docstring).

    Args:
        size: ``(height, width)`` of the result, or one int for a square.
        interpolation: ``bilinear`` (default) or ``bicubic``, both antialiased.

    Raises:
        ValueError: a size that is not one or two positive integers, or another interpolation.
    """

    size: tuple[int, int]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _size_pair(self.size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}"
            )

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``centre crop + bilinear resize to 224x224``."""
        h, w = self.size
        return f"centre crop + antialiased {self.interpolation} resize to {h}x{w} (height x width)"

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, crop_height, crop_width)``: the centre region of a ``height x width``
        image with the target's aspect ratio, which is then resized to :attr:`size`."""
        th, tw = self.size
        if th * width >= tw * height:  # the image is relatively wider: keep its full height
            ch, cw = height, max(1, min(width, _round_div(height * tw, th)))
        else:  # relatively taller: keep its full width
            ch, cw = max(1, min(height, _round_div(width * th, tw))), width
        return (height - ch) // 2, (width - cw) // 2, ch, cw

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """An image float32 ``[3, h, w]`` in ``[0, 1]`` as float32 ``[3, H, W]`` in ``[0, 1]``."""
        if tuple(x.shape[-2:]) == self.size:
            return x
        top, left, ch, cw = self.crop_box(int(x.shape[-2]), int(x.shape[-1]))
        crop = x[:, top : top + ch, left : left + cw]
        if (ch, cw) == self.size:
            return crop.contiguous()
        out = F.interpolate(
            crop[None].float(),
            size=self.size,
            mode=self.interpolation,
            align_corners=False,
            antialias=True,
        )[0]
        return out.clamp_(0.0, 1.0).contiguous()

    def mask(self, m: torch.Tensor) -> torch.Tensor:
        """A mask bool ``[1, h, w]`` as bool ``[1, H, W]`` (nearest neighbour at pixel centres)."""
        if tuple(m.shape[-2:]) == self.size:
            return m
        top, left, ch, cw = self.crop_box(int(m.shape[-2]), int(m.shape[-1]))
        crop = m[:, top : top + ch, left : left + cw]
        if (ch, cw) == self.size:
            return crop.contiguous()
        out = F.interpolate(crop[None].to(torch.uint8), size=self.size, mode="nearest-exact")[0]
        return out.bool().contiguous()


def probe_transform(
    size: int | tuple[int, int] | list[int] | None,
    interpolation: str = "bilinear",
    *,
    input_size: tuple[int, int] | None = None,
) -> ProbeTransform | None:
    """The transform ``probes.transform`` asks for: to ``size`` when given, else to the model's
    ``input_size`` when its loader knows it (:attr:`audit.gate.loading.LoadedModel.input_size`),
    else None (then every probe image must already have one size).

    Raises:
        ValueError: a bad size or interpolation, or an explicit ``size`` other than the
            model's ``input_size`` (a model with a fixed input cannot take it).
    """
    if interpolation not in INTERPOLATIONS:  # checked even while the size waits for the model's
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}"
        )
    model = (
        None if input_size is None else _size_pair(input_size, "the model's input size", _MODEL_FIX)
    )
    if size is None:
        return None if model is None else ProbeTransform(model, interpolation)
    t = ProbeTransform(size, interpolation)
    if model is not None and t.size != model:
        raise ValueError(
            f"probes.transform.size asks for {t.size[0]}x{t.size[1]} but the model takes "
            f"{model[0]}x{model[1]} (height x width, its input size); set probes.transform.size="
            f"[{model[0]},{model[1]}] or drop it to use the model's size"
        )
    return t


_SIZE_FIX = "a positive integer (a square side, e.g. 224) or [height, width]"
_MODEL_FIX = (
    "two positive integers (height, width); fix the model's source or set probes.transform.size"
)


def _size_pair(size: object, what: str = "size", fix: str = _SIZE_FIX) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints, each at least 1."""
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        h, w = pair  # type: ignore[misc]
    except (TypeError, ValueError):
        h = w = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (h, w)):
        raise ValueError(f"{what} must be {fix}; got {size!r}")
    return int(h), int(w)  # type: ignore[arg-type]


def _round_div(a: int, b: int) -> int:
    """``round(a / b)`` for non-negative integers, halves up, exactly."""
    return (2 * a + b) // (2 * b)
