"""Pictures of the evidence: overlay grids, deletion/insertion curve plots, image grids.

Everything returns a ``PIL.Image.Image`` (RGB) built from CPU tensors or numpy
arrays. Grids are composed with numpy and Pillow (fast: a 16-probe grid takes a few
milliseconds); plots use Matplotlib's object API with the Agg canvas, so no global
backend or pyplot state is touched and rendering is safe off the main thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "heatmap",
    "overlay",
    "overlay_grid",
    "image_grid",
    "prediction_grid",
    "colour_scale",
    "curve_plot",
    "faithfulness_plot",
]

_GOOD = (20, 120, 40)
_BAD = (200, 30, 30)
_TEXT = (30, 30, 30)


def _array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (
        x.detach().cpu().float().numpy()
        if isinstance(x, torch.Tensor)
        else np.asarray(x, dtype=np.float32)
    )


def heatmap(maps: torch.Tensor | np.ndarray, cmap: str | None = None) -> np.ndarray:
    """Colour maps ``[N, 1, H, W]`` (or ``[N, H, W]``) as uint8 RGB ``[N, H, W, 3]``.

    Each map is scaled on its own. A map with negative values is signed: zero is the
    middle of the diverging ``bwr`` colormap and ``max |value|`` its ends. A
    non-negative map runs from 0 to its maximum on ``inferno``. A constant map is
    drawn at the colormap's low end (or middle, when signed).
    """
    a = _array(maps)
    if a.ndim == 4:
        a = a[:, 0]
    flat = a.reshape(a.shape[0], -1)
    signed = (flat < 0).any(axis=1)
    scale = np.abs(flat).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)[:, None, None]
    out = np.empty((*a.shape, 3), dtype=np.uint8)
    for i in range(a.shape[0]):
        if signed[i]:
            name, v = cmap or "bwr", 0.5 + 0.5 * a[i] / scale[i]
        else:
            name, v = cmap or "inferno", a[i] / scale[i]
        rgba = matplotlib.colormaps[name](np.clip(v, 0.0, 1.0), bytes=True)
        out[i] = rgba[..., :3]
    return out


def overlay(
    images: torch.Tensor | np.ndarray, maps: torch.Tensor | np.ndarray, alpha: float = 0.55
) -> np.ndarray:
    """Heatmaps blended over the images: uint8 ``[N, H, W, 3]``.

    Args:
        images: ``[N, 3, H, W]`` in ``[0, 1]``.
        maps: ``[N, 1, H, W]``.
        alpha: weight of the heatmap.
    """
    img = np.clip(_array(images), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0
    heat = heatmap(maps).astype(np.float32)
    return (alpha * heat + (1.0 - alpha) * img).round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return a.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else a


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels; a word wider than
    that is cut with an ellipsis (captions never run into the next tile)."""

    def wide(t: str) -> bool:
        return draw.textlength(t, font=font) > width

    lines: list[str] = []
    for word in text.split(" "):
        if lines and not wide(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while wide(word) and len(word) > 1:
            word = word[:-2] + "\u2026" if len(word) > 2 else word[:1]
        lines.append(word)
    return lines or [""]


def _grid(
    tiles: np.ndarray,
    captions: Sequence[Sequence[tuple[str, tuple[int, int, int]]]],
    ncols: int,
    title: str | None,
) -> Image.Image:
    """Tiles uint8 ``[N, h, w, 3]`` in a grid with captions (lines of (text, colour)) under each.

    A caption line wider than its tile wraps at spaces (and a word still too wide is cut),
    so neighbouring captions never overlap."""
    n, h, w, _ = tiles.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fsize = max(10, min(16, w // 14))
    font = _font(fsize)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [
        [(part, colour) for text, colour in cap for part in _fit(text, font, w - 2, measure)]
        for cap in captions
    ]
    lines = max((len(c) for c in wrapped), default=0)
    cap_h = lines * (fsize + 3) + 4
    pad = 6
    top = (fsize + 10) if title else 0
    W = ncols * (w + pad) + pad
    H = top + nrows * (h + cap_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill=_TEXT, font=font)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0 = pad + c * (w + pad)
        y0 = top + pad + r * (h + cap_h + pad)
        canvas.paste(Image.fromarray(tiles[i]), (x0, y0))
        for j, (text, colour) in enumerate(wrapped[i] if i < len(wrapped) else ()):
            draw.text((x0 + 2, y0 + h + 2 + j * (fsize + 3)), text, fill=colour, font=font)
    return canvas


def overlay_grid(
    images: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    labels: Sequence[str],
    predictions: Sequence[str],
    notes: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    scale: int | None = None,
    alpha: float = 0.55,
    title: str | None = None,
) -> Image.Image:
    """One tile per probe: the image and its heatmap overlay side by side, captioned.

    The caption gives the true and the predicted class (green when they agree, red
    when not) and an optional note per probe (e.g. its group).

    Args:
        images: ``[N, 3, H, W]`` in ``[0, 1]``.
        maps: ``[N, 1, H, W]`` attribution maps.
        labels: true class name per probe.
        predictions: predicted class name per probe.
        notes: an extra caption line per probe.
        ncols: tiles per row.
        scale: integer upscaling of each image (nearest neighbour) for legibility;
            default 2 below 48 pixels, else 1 (smaller PNGs: cheaper to encode and log).
        alpha: heatmap weight in the overlay.
        title: a line above the grid.
    """
    img = (np.clip(_array(images), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0).round().astype(np.uint8)
    scale = scale if scale is not None else (2 if img.shape[1] < 48 else 1)
    over = overlay(images, maps, alpha)
    gap = np.full((img.shape[0], img.shape[1], 2, 3), 255, dtype=np.uint8)
    tiles = _upscale(np.concatenate([img, gap, over], axis=2), scale)
    captions = []
    for i in range(img.shape[0]):
        ok = labels[i] == predictions[i]
        cap = [(f"true {labels[i]}", _TEXT), (f"pred {predictions[i]}", _GOOD if ok else _BAD)]
        if notes is not None:
            cap.append((notes[i], _TEXT))
        captions.append(cap)
    return _grid(tiles, captions, ncols, title)


def image_grid(
    images: torch.Tensor | np.ndarray,
    captions: Sequence[str] = (),
    *,
    ncols: int = 8,
    scale: int = 2,
    title: str | None = None,
) -> Image.Image:
    """Images ``[N, 3, H, W]`` in ``[0, 1]`` in a captioned grid (e.g. activation maximization)."""
    img = (np.clip(_array(images), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0).round().astype(np.uint8)
    caps = [[(c, _TEXT)] for c in captions]
    return _grid(_upscale(img, scale), caps, ncols, title)


def curve_plot(
    curves: Mapping[str, Mapping[str, torch.Tensor | np.ndarray]],
    *,
    title: str | None = None,
    dpi: int = 80,
) -> Image.Image:
    """Mean deletion and insertion curves, one panel per kind and one line per method.

    Args:
        curves: method -> kind (``"deletion"``/``"insertion"``) -> curves ``[N, steps + 1]``
            (averaged over probes here) or one mean curve ``[steps + 1]``. A method named
            ``"random"`` is drawn dashed in grey (the chance reference).
        title: the figure title.
        dpi: resolution (the figure is 8 x 3.2 inches).
    """
    kinds = [k for k in ("deletion", "insertion") if any(k in c for c in curves.values())]
    fig = Figure(figsize=(4.0 * max(1, len(kinds)), 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=False):
        for method, per in curves.items():
            if kind not in per:
                continue
            c = _array(per[kind])
            mean = c.mean(axis=0) if c.ndim == 2 else c
            x = np.linspace(0.0, 1.0, mean.shape[0])
            auc = float(np.sum((mean[1:] + mean[:-1]) / 2.0) / (mean.shape[0] - 1))
            style = {"color": "0.5", "linestyle": "--"} if method == "random" else {}
            ax.plot(x, mean, label=f"{method} (AUC {auc:.3f})", **style)
        ax.set_title(
            f"{kind} ({'lower' if kind == 'deletion' else 'higher'} is better)", fontsize=10
        )
        ax.set_xlabel("share of pixels " + ("removed" if kind == "deletion" else "revealed"))
        ax.set_ylabel("target probability")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right" if kind == "deletion" else "lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=0.16, top=0.82, wspace=0.25
    )  # tight_layout costs ~0.15 s
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def prediction_grid(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[str],
    predictions: Sequence[str],
    notes: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    scale: int | None = None,
) -> Image.Image:
    """The images themselves, captioned with an optional note (e.g. the group), the true class
    and the predicted one (green when right, red when wrong): examples for a reviewer."""
    img = (np.clip(_array(images), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0).round().astype(np.uint8)
    scale = scale if scale is not None else max(1, 96 // max(1, img.shape[1]))
    captions = []
    for i in range(img.shape[0]):
        ok = labels[i] == predictions[i]
        cap = [] if notes is None else [(notes[i], _TEXT)]
        cap += [(f"true {labels[i]}", _TEXT), (f"pred {predictions[i]}", _GOOD if ok else _BAD)]
        captions.append(cap)
    return _grid(_upscale(img, scale), captions, ncols, None)


def colour_scale(signed: bool, *, width: float = 4.8, dpi: int = 80) -> Image.Image:
    """The colour bar of :func:`heatmap`: ``inferno`` from 0 to the map's maximum, or, for
    signed maps, ``bwr`` from ``-max |value|`` through 0 to ``+max |value|`` (each map is
    scaled on its own, so the ends are relative, not absolute relevance)."""
    fig = Figure(figsize=(width, 0.75), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.52, 0.92, 0.3))
    ramp = np.linspace(-1.0 if signed else 0.0, 1.0, 256)[None, :]
    ax.imshow(
        ramp,
        aspect="auto",
        cmap="bwr" if signed else "inferno",
        vmin=-1.0 if signed else 0.0,
        vmax=1.0,
        extent=(ramp[0, 0], 1.0, 0.0, 1.0),
    )
    ax.set_yticks([])
    if signed:
        ax.set_xticks(
            [-1.0, 0.0, 1.0],
            ["-max |relevance| (against the class)", "0", "+max |relevance| (for it)"],
        )
    else:
        ax.set_xticks([0.0, 1.0], ["0 (no relevance)", "the map's maximum"])
    ax.tick_params(labelsize=8)
    ticks = ax.get_xticklabels()
    ticks[0].set_horizontalalignment("left")  # the end labels stay inside the picture
    ticks[-1].set_horizontalalignment("right")
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def faithfulness_plot(
    curves: Mapping[str, Mapping[str, torch.Tensor | np.ndarray]],
    *,
    title: str | None = None,
    dpi: int = 80,
) -> tuple[Image.Image, list[str]]:
    """The faithfulness filter's curves: per method, the mean deletion curve with its most
    relevant pixels removed first (MoRF, solid) and with its least relevant first (LeRF,
    dashed, same colour); the area between them is the symmetric relevance gain. A method
    named ``"random"`` (the random-ordering reference, when measured) is drawn dotted in grey.

    Returns:
        The picture and what it draws: ``"MoRF"``, ``"LeRF"`` and ``"random"`` as present,
        so a caption can name exactly what is there.
    """
    fig = Figure(figsize=(6.4, 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn: list[str] = []
    colours = iter(f"C{i % 10}" for i in range(1000))
    for method, per in curves.items():
        if method == "random":
            if "deletion" in per:
                mean = _mean_curve(per["deletion"])
                ax.plot(
                    np.linspace(0, 1, mean.shape[0]),
                    mean,
                    color="0.5",
                    linestyle=":",
                    label="random ordering",
                )
                drawn.append("random")
            continue
        colour = next(colours)
        for kind, name, style in (("deletion", "MoRF", "-"), ("lerf", "LeRF", "--")):
            if kind in per:
                mean = _mean_curve(per[kind])
                auc = float(np.sum((mean[1:] + mean[:-1]) / 2.0) / max(1, mean.shape[0] - 1))
                ax.plot(
                    np.linspace(0, 1, mean.shape[0]),
                    mean,
                    color=colour,
                    linestyle=style,
                    label=f"{method} {name} (AUC {auc:.3f})",
                )
                if name not in drawn:
                    drawn.append(name)
    ax.set_xlabel("share of pixels removed")
    ax.set_ylabel("target probability")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.88)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()), drawn


def _mean_curve(c: torch.Tensor | np.ndarray) -> np.ndarray:
    a = _array(c)
    return a.mean(axis=0) if a.ndim == 2 else a
