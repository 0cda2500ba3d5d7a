"""The probe set: the fixed images an audit explains, and their identity.

A :class:`ProbeSet` holds images in display space (float32 in [0, 1]), integer
labels indexing ``class_names``, and optional object masks, context groups and
counterfactual pair ids. Its :attr:`ProbeSet.digest` is a content hash that
identifies it in every log, report and registry tag.

The folder format (see DESIGN.md)::

    <folder>/classes.txt    one class name per line; line i is model output i
    <folder>/manifest.csv   header: image,label[,mask][,group][,pair]
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["ProbeSet", "ProbeSetError"]

_REQUIRED_COLUMNS = ("image", "label")
_OPTIONAL_COLUMNS = ("mask", "group", "pair")
_DIGEST_VERSION = b"model-audit/probeset/v1"


class ProbeSetError(ValueError):
    """A probe set or probe folder is malformed. The message names the file and row."""


@dataclass(eq=False)
class ProbeSet:
    """Images, labels and optional masks/groups/pairs that an audit explains.

    Args:
        images: float32 ``[N, 3, H, W]`` in ``[0, 1]``.
        labels: int64 ``[N]``, indices into ``class_names``.
        class_names: name of model output ``i`` at index ``i``.
        masks: bool ``[N, 1, H, W]``; True marks the object (the evidence the model
            should use). Optional.
        groups: int64 ``[N]`` indices into ``group_names``. Optional. By convention a
            group name is ``"<class>|<context>"``, e.g. ``"wolf|snow"``.
        group_names: names of the groups.
        pairs: int64 ``[N]``; rows sharing a value show the same object in a different
            spurious context. Optional.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    masks: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    group_names: list[str] = field(default_factory=list)
    pairs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.class_names = [str(c) for c in self.class_names]
        self.group_names = [str(g) for g in self.group_names]
        imgs = self.images
        if not isinstance(imgs, torch.Tensor) or imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ProbeSetError(
                f"images must be a float tensor [N, 3, H, W]; got {_describe(imgs)}"
            )
        if not imgs.is_floating_point():
            raise ProbeSetError(
                f"images must be float32 in [0, 1]; got dtype {imgs.dtype} "
                "(divide uint8 images by 255)"
            )
        self.images = imgs.detach().to(torch.float32)
        n, _, h, w = self.images.shape
        if n == 0:
            raise ProbeSetError("a probe set needs at least one image; got N = 0")
        if not torch.isfinite(self.images).all():
            raise ProbeSetError("images contain NaN or Inf")
        lo, hi = float(self.images.min()), float(self.images.max())
        if lo < 0.0 or hi > 1.0:
            raise ProbeSetError(
                f"images must lie in [0, 1] (display space); got values in [{lo:.3g}, {hi:.3g}]. "
                "Model normalization belongs in the model config, not in the probes."
            )
        if not self.class_names:
            raise ProbeSetError("class_names is empty; give one name per model output")
        if len(set(self.class_names)) != len(self.class_names):
            raise ProbeSetError(f"class_names has duplicates: {self.class_names}")
        self.labels = _index_tensor(self.labels, n, "labels")
        bad = (self.labels < 0) | (self.labels >= len(self.class_names))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ProbeSetError(
                f"labels[{i}] = {int(self.labels[i])} is not a class index; "
                f"valid: 0..{len(self.class_names) - 1} ({self.class_names})"
            )
        if self.masks is not None:
            m = self.masks
            if not isinstance(m, torch.Tensor) or m.ndim != 4 or tuple(m.shape) != (n, 1, h, w):
                raise ProbeSetError(
                    f"masks must be a bool tensor [{n}, 1, {h}, {w}]; got {_describe(m)}"
                )
            self.masks = m.detach().bool()
        if self.groups is not None:
            self.groups = _index_tensor(self.groups, n, "groups")
            if not self.group_names:
                raise ProbeSetError("groups were given without group_names")
            bad = (self.groups < 0) | (self.groups >= len(self.group_names))
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ProbeSetError(
                    f"groups[{i}] = {int(self.groups[i])} is not an index into "
                    f"group_names ({len(self.group_names)} names)"
                )
        if self.pairs is not None:
            self.pairs = _index_tensor(self.pairs, n, "pairs")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        extras = [k for k in ("masks", "groups", "pairs") if getattr(self, k) is not None]
        return (
            f"ProbeSet(n={n}, size={h}x{w}, classes={self.class_names}, "
            f"with={extras}, digest={self.digest[:12]})"
        )

    @property
    def size(self) -> tuple[int, int]:
        """Image height and width."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def group_of(self, i: int) -> str | None:
        """The group name of row ``i``, or None without groups."""
        if self.groups is None:
            return None
        return self.group_names[int(self.groups[i])]

    def subset(self, index: Sequence[int] | torch.Tensor) -> ProbeSet:
        """The rows ``index`` as a new probe set (group names and classes kept)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return ProbeSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            masks=None if self.masks is None else self.masks[idx],
            groups=None if self.groups is None else self.groups[idx],
            group_names=list(self.group_names),
            pairs=None if self.pairs is None else self.pairs[idx],
        )

    # ------------------------------------------------------------------ digest
    @property
    def digest(self) -> str:
        """A SHA-256 of the content, stable across processes, machines and round trips.

        It covers every pixel (float32, little endian), label, mask bit, group and
        class name, and the pair structure. Group and pair *ids* are normalised
        (groups by name, pairs by first appearance), so renumbering them keeps the
        identity while any change of content gives a new digest.
        """
        h = hashlib.sha256(_DIGEST_VERSION)

        def put(tag: str, payload: bytes) -> None:
            h.update(tag.encode())
            h.update(len(payload).to_bytes(8, "little"))
            h.update(payload)

        put("shape", np.asarray(self.images.shape, dtype="<i8").tobytes())
        put("images", self.images.contiguous().cpu().numpy().astype("<f4", copy=False).tobytes())
        put("labels", self.labels.cpu().numpy().astype("<i8").tobytes())
        put("classes", "\n".join(self.class_names).encode())
        if self.masks is not None:
            put("masks", np.packbits(self.masks.cpu().numpy().astype(np.uint8)).tobytes())
        if self.groups is not None:
            names = [self.group_names[int(g)] for g in self.groups]
            put("groups", "\n".join(names).encode())
        if self.pairs is not None:
            put("pairs", _first_appearance(self.pairs).numpy().astype("<i8").tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ folder IO
    def save(self, folder: str | Path) -> Path:
        """Write the probe set in the probe folder format and return the folder.

        Images and masks are written as 8-bit PNG. If the images are not exactly
        representable in 8 bits the loaded set differs from this one (and so does
        its digest); a warning says so.
        """
        folder = Path(folder)
        q = torch.round(self.images * 255.0)
        if not torch.equal(q / 255.0, self.images):
            warnings.warn(
                "ProbeSet.save: images are not exactly representable as 8-bit PNG; the "
                "saved probe set will load with rounded pixels and a different digest. "
                "Quantize first (images = round(images * 255) / 255) to round-trip exactly.",
                stacklevel=2,
            )
        (folder / "images").mkdir(parents=True, exist_ok=True)
        if self.masks is not None:
            (folder / "masks").mkdir(parents=True, exist_ok=True)
        (folder / "classes.txt").write_text("".join(f"{c}\n" for c in self.class_names))
        for c in self.class_names:
            if "\n" in c or not c.strip():
                raise ProbeSetError(f"class name {c!r} cannot be written to classes.txt")

        pixels = q.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        columns = ["image", "label"]
        if self.masks is not None:
            columns.append("mask")
        if self.groups is not None:
            columns.append("group")
        if self.pairs is not None:
            columns.append("pair")
        width = max(4, len(str(len(self) - 1)))
        rows = []
        for i in range(len(self)):
            name = f"{i:0{width}d}.png"
            Image.fromarray(pixels[i], mode="RGB").save(folder / "images" / name)
            row = {"image": f"images/{name}", "label": self.class_names[int(self.labels[i])]}
            if self.masks is not None:
                m = self.masks[i, 0].numpy().astype(np.uint8) * 255
                Image.fromarray(m, mode="L").save(folder / "masks" / name)
                row["mask"] = f"masks/{name}"
            if self.groups is not None:
                row["group"] = self.group_names[int(self.groups[i])]
            if self.pairs is not None:
                row["pair"] = str(int(self.pairs[i]))
            rows.append(row)
        with open(folder / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ProbeSet:
        """Read a probe folder, validating it. Raises :class:`ProbeSetError`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ProbeSetError(f"probe folder {folder} does not exist or is not a folder")
        class_names = _read_classes(folder / "classes.txt")
        header, rows = _read_manifest(folder / "manifest.csv")
        manifest = folder / "manifest.csv"
        class_index = {c: i for i, c in enumerate(class_names)}

        images, labels, masks, group_strs, pair_strs = [], [], [], [], []
        seen: dict[str, int] = {}
        size: tuple[int, int] | None = None
        first_image = ""
        for line, row in rows:
            where = f"{manifest}, row {line}"
            rel = row["image"].strip()
            if not rel:
                raise ProbeSetError(f"{where}: the 'image' cell is empty")
            key = str(Path(rel))
            if key in seen:
                raise ProbeSetError(
                    f"{where}: duplicate row: image '{rel}' is already listed in row {seen[key]}; "
                    "list each image once"
                )
            seen[key] = line
            label = row["label"].strip()
            if label not in class_index:
                raise ProbeSetError(
                    f"{where}: label '{label}' is not in classes.txt ({', '.join(class_names)}); "
                    "fix the label or add the class to classes.txt"
                )
            img = _read_image(folder, rel, where, mode="RGB")
            if size is None:
                size, first_image = img.shape[:2], rel
            elif img.shape[:2] != size:
                raise ProbeSetError(
                    f"{where}: image '{rel}' is {img.shape[1]}x{img.shape[0]} but '{first_image}' "
                    f"is {size[1]}x{size[0]}; all probe images must have one size (resize them)"
                )
            images.append(img)
            labels.append(class_index[label])
            if "mask" in header:
                mrel = row["mask"].strip()
                if not mrel:
                    raise ProbeSetError(
                        f"{where}: the 'mask' cell is empty; give every row a mask or drop the column"
                    )
                m = _read_image(folder, mrel, where, mode="L")
                if m.shape != img.shape[:2]:
                    raise ProbeSetError(
                        f"{where}: mask '{mrel}' is {m.shape[1]}x{m.shape[0]} but its image "
                        f"'{rel}' is {img.shape[1]}x{img.shape[0]}; a mask must match its image"
                    )
                masks.append(m > 0)
            if "group" in header:
                g = row["group"].strip()
                if not g:
                    raise ProbeSetError(
                        f"{where}: the 'group' cell is empty; give every row a group or drop the column"
                    )
                group_strs.append(g)
            if "pair" in header:
                pair_strs.append(row["pair"].strip())

        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
        group_names: list[str] = []
        groups = None
        if group_strs:
            group_names = list(dict.fromkeys(group_strs))
            gi = {g: i for i, g in enumerate(group_names)}
            groups = torch.tensor([gi[g] for g in group_strs], dtype=torch.long)
        pairs = None
        if pair_strs:
            # An empty pair cell means "no partner": give the row an id of its own.
            ids: dict[str, int] = {}
            values = []
            for j, p in enumerate(pair_strs):
                key = p if p else f"\0unpaired{j}"
                values.append(ids.setdefault(key, len(ids)))
            pairs = torch.tensor(values, dtype=torch.long)
        return cls(
            images=x,
            labels=torch.tensor(labels, dtype=torch.long),
            class_names=class_names,
            masks=torch.from_numpy(np.stack(masks))[:, None] if masks else None,
            groups=groups,
            group_names=group_names,
            pairs=pairs,
        )


# ---------------------------------------------------------------------- helpers
def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _index_tensor(x: object, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1 or t.shape[0] != n:
        raise ProbeSetError(f"{name} must have shape [{n}] (one per image); got {_describe(t)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ProbeSetError(f"{name} must be integers; got dtype {t.dtype}")
    return t.detach().to(torch.long).cpu()


def _first_appearance(ids: torch.Tensor) -> torch.Tensor:
    """Relabel ids 0, 1, 2, ... in order of first appearance (keeps the partition)."""
    mapping: dict[int, int] = {}
    return torch.tensor([mapping.setdefault(int(v), len(mapping)) for v in ids], dtype=torch.long)


def _read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise ProbeSetError(
            f"{path} is missing; write one class name per line (line i = model output i)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeSetError(f"{path} cannot be read as UTF-8 text: {e}") from None
    names = [ln.strip() for ln in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ProbeSetError(f"{path} is empty; write one class name per line (line i = model output i)")
    for i, c in enumerate(names, start=1):
        if not c:
            raise ProbeSetError(f"{path}, line {i}: empty class name; every line up to the last needs a name")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ProbeSetError(f"{path}: class names listed twice: {', '.join(dup)}")
    return names


def _read_manifest(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not path.is_file():
        raise ProbeSetError(
            f"{path} is missing; write a CSV with the header image,label[,mask][,group][,pair]"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ProbeSetError(
                    f"{path} is empty; it needs the header image,label[,mask][,group][,pair]"
                )
            header = [h.strip().lower() for h in header]
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ProbeSetError(
                    f"{path}: header {','.join(header)} lacks the required column(s) "
                    f"{', '.join(missing)}; the header is image,label[,mask][,group][,pair]"
                )
            unknown = [c for c in header if c not in _REQUIRED_COLUMNS + _OPTIONAL_COLUMNS]
            if unknown:
                raise ProbeSetError(
                    f"{path}: unknown column(s) {', '.join(unknown)}; allowed columns are "
                    f"{', '.join(_REQUIRED_COLUMNS + _OPTIONAL_COLUMNS)}"
                )
            if len(set(header)) != len(header):
                raise ProbeSetError(f"{path}: a column is named twice in the header {','.join(header)}")
            rows = []
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise ProbeSetError(
                        f"{path}, row {line}: {len(cells)} cells but the header has {len(header)} "
                        f"({','.join(header)})"
                    )
                rows.append((line, dict(zip(header, cells, strict=True))))
    except csv.Error as e:
        raise ProbeSetError(f"{path}: not a valid CSV file: {e}") from None
    except UnicodeDecodeError as e:
        raise ProbeSetError(f"{path} cannot be read as UTF-8 text: {e}") from None
    if not rows:
        raise ProbeSetError(f"{path} lists no images; add one row per probe image")
    return header, rows


def _read_image(folder: Path, rel: str, where: str, mode: str) -> np.ndarray:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ProbeSetError(f"{where}: path '{rel}' must be relative to the probe folder, inside it")
    path = folder / p
    if not path.is_file():
        raise ProbeSetError(f"{where}: file '{rel}' does not exist (looked for {path})")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ProbeSetError(
            f"{where}: file '{rel}' cannot be read as an image (PNG or JPEG expected): {e}"
        ) from None
