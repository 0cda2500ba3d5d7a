"""The probe set: the fixed images an audit explains, and their identity.

A :class:`ProbeSet` holds images in display space (float32 in [0, 1]), integer
labels indexing ``class_names``, and optional object masks, context groups and
counterfactual pair ids. Its :attr:`ProbeSet.digest` is a content hash that
identifies it in every log, report and registry tag.

The folder format (docs/probes.md has every column, limit and check)::

    <folder>/classes.txt    one class name per line; line i is model output i
    <folder>/manifest.csv   header: image,label[,mask][,group][,pair]

A probe folder is treated as hostile: :meth:`ProbeSet.load` keeps every path inside
the folder, reads image sizes from the headers before decoding anything, keeps pixel
values (16-bit grayscale included) or refuses the file, and checks that class and
group names will be valid MLflow metric keys, that a group's class is its row's
label and that a pair joins rows of one label. Each problem is one
:class:`ProbeSetError` with a one-line message naming the file, the row, the
problem and the fix.

Images of any size are brought to one by a :class:`~audit.probes.transform.ProbeTransform`
(``transform=``; ``probes.transform`` in the job): every check above holds on the files'
own sizes, and the transform runs on each image right after it is decoded.

A folder too large to hold is opened instead: :meth:`ProbeSet.open` runs the same
checks (``load`` is ``open`` plus decoding every row) and returns a
:class:`ProbeFolder`, which keeps the metadata (labels, groups, pairs: a few hundred
bytes a row with its file entry) and decodes rows on demand: whole passes through a
``torch.utils.data.DataLoader`` (workers decode, order kept; torch's own batching,
worker management and shared-memory collation rather than a pool of our own), and
bounded sets of rows through ``subset`` and the lazy ``images``/``masks``. Its digest
is the in-memory digest, hashed a batch at a time. Measured (tests/probes/test_streaming.py,
2 CPU cores): an audit of 2,400 probes of 128 x 128 px (472 MB of float32) ran in a
process allowed 200 MB more private memory, where ``load`` failed to allocate.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from audit.errors import AuditError
from audit.gate.tracking import metric_key
from audit.probes.transform import ProbeTransform

__all__ = [
    "ProbeSet",
    "ProbeFolder",
    "ProbeSetError",
    "ProbeTransform",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_TOTAL_PIXELS",
    "MAX_NAME_LENGTH",
    "NAME_RULE",
    "pixels_problem",
    "name_problem",
]

_REQUIRED_COLUMNS = ("image", "label")
_OPTIONAL_COLUMNS = ("mask", "group", "pair")
_DIGEST_VERSION = b"model-audit/probeset/v1"

#: Default :meth:`ProbeSet.load` limit on one image's pixels (width x height), read from its header.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Default :meth:`ProbeSet.load` limit on all images' pixels together (N x H x W): 1.6 GB as float32.
DEFAULT_MAX_TOTAL_PIXELS = 2**27
#: The longest class name or group context; MLflow keys hold at most 250 characters.
MAX_NAME_LENGTH = 200
#: The fix named in every message about a bad class or context name.
NAME_RULE = (
    "names may use only ASCII letters, digits, '_', '-', '.' and single inner spaces, "
    f"at most {MAX_NAME_LENGTH} characters (they become MLflow metric keys)"
)
_BAD_NAME_CHAR = re.compile(r"[^A-Za-z0-9_\-. ]")
_MAX_TEXT_BYTES = 64 * 2**20
_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
_GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_MODES = frozenset({"1", "L", "P", "LA", "PA", "RGB", "RGBA", "I", "F", *_GRAY16})


class ProbeSetError(AuditError, ValueError):
    """A probe set or probe folder is malformed. The message names the file and row."""

    topic = "bad probe set"


def pixels_problem(
    n: int,
    height: int,
    width: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS,
) -> str | None:
    """What is too big about ``n`` images of ``height x width`` held in memory, or None.

    The limits of a probe folder read whole (:meth:`ProbeSet.load`), for probe sets made
    in memory (the synthetic benchmarks): one image at most ``max_pixels`` pixels, all
    together at most ``max_total_pixels``. Pure arithmetic: call it before allocating.
    """
    if height * width > max_pixels:
        return f"one image of {width}x{height} is {height * width} pixels, above the limit of {max_pixels} per image"
    if n * height * width > max_total_pixels:
        gb = n * height * width * 3 * 4 / 1e9
        return (
            f"{n} images of {width}x{height} are {n * height * width} pixels in all ({gb:.1f} GB as float32), "
            f"above the limit of {max_total_pixels} pixels a probe set may hold in memory"
        )
    return None


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
        for i, c in enumerate(self.class_names):
            if not c.strip() or not c.isprintable():
                raise ProbeSetError(
                    f"class_names[{i}] = {_q(c)} is empty or has a newline or control character; "
                    "give each class a one-line name"
                )
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
            self._check_group_classes()
        if self.pairs is not None:
            self.pairs = _index_tensor(self.pairs, n, "pairs")
            first: dict[int, int] = {}
            for i, (p, y) in enumerate(zip(self.pairs.tolist(), self.labels.tolist(), strict=True)):
                j = first.setdefault(p, i)
                if int(self.labels[j]) != y:
                    raise ProbeSetError(
                        f"pairs: rows {j} and {i} share pair {p} but are labelled "
                        f"{_q(self.class_names[int(self.labels[j])])} and {_q(self.class_names[y])}; "
                        "the rows of a pair show one object, so they share a label"
                    )

    def _check_group_classes(self) -> None:
        """A group named ``<class>|<context>`` holds rows of that class only."""
        assert self.groups is not None
        class_index = {c: i for i, c in enumerate(self.class_names)}
        for gi in torch.unique(self.groups).tolist():
            name = self.group_names[gi]
            if "|" not in name:
                continue  # not the <class>|<context> convention; ProbeSet.load refuses it
            cls = name.split("|", 1)[0]
            rows = (self.groups == gi).nonzero()[:, 0]
            if cls not in class_index:
                raise ProbeSetError(
                    f"group {_q(name)} (row {int(rows[0])}) names class {_q(cls)}, which is not in "
                    f"class_names ({', '.join(self.class_names)}); a group is '<class>|<context>'"
                )
            bad = rows[self.labels[rows] != class_index[cls]]
            if bad.numel():
                i = int(bad[0])
                raise ProbeSetError(
                    f"row {i} is in group {_q(name)} but labelled "
                    f"{_q(self.class_names[int(self.labels[i])])}; a group '<class>|<context>' "
                    "holds rows of that class only"
                )

    def check_names(self) -> None:
        """Raise :class:`ProbeSetError` unless every name can become an MLflow metric key.

        :meth:`load` checks this for a folder; call it for a probe set built in memory
        before an audit that logs to MLflow. Class names follow :func:`name_problem`;
        group names are ``<class>|<context>`` with a class of ``class_names`` and a
        context that follows :func:`name_problem`; no two groups give one metric key.
        """
        _check_names(self.class_names, self.group_names)

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

    def batches(
        self,
        rows: Sequence[int] | torch.Tensor | None = None,
        batch_size: int = 128,
        *,
        workers: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The images of ``rows`` (None: every row, in order) as ``(rows, images)`` batches.

        Consecutive pieces of ``rows`` of at most ``batch_size``; ``workers`` is accepted for
        the same call on a streamed probe folder (:meth:`ProbeFolder.batches`; in memory
        nothing is read).
        """
        del workers
        index = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        for s in range(0, int(index.numel()), max(int(batch_size), 1)):
            part = index[s : s + batch_size]
            if rows is None:
                yield part, self.images[int(part[0]) : int(part[-1]) + 1]
            else:
                yield part, self.images[part]

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
    def load(
        cls,
        folder: str | Path,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS,
        transform: ProbeTransform | None = None,
    ) -> ProbeSet:
        """Read a probe folder, treating every file in it as hostile. Raises :class:`ProbeSetError`.

        Every error is one :class:`ProbeSetError` whose one-line message names the
        file, the row (or line), the problem and the fix. What is checked:

        * **Files stay inside the folder.** ``classes.txt``, ``manifest.csv`` and every
          image and mask path must be relative, resolve (symbolic links followed) to a
          path inside the resolved folder, and be a regular file: a link that leads
          out of the folder, a directory, a FIFO or a device is refused. An image
          listed twice (also through a link) is refused.
        * **Sizes are checked from the header, before decoding.** An image or mask
          above ``max_pixels`` pixels (default ``4096 * 4096``, about 16.8 M) is refused
          without decoding it; so is a probe set whose ``N * H * W`` is above
          ``max_total_pixels`` (default ``2**27``, about 134 M pixels: 1.6 GB of float32
          images), before the first image is decoded. Pillow's own decompression-bomb
          limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top and is reported in
          the same way. Formats: PNG, JPEG, BMP, TIFF and WebP, one frame.
        * **Pixel values are kept.** Accepted modes and their scaling to ``[0, 1]``:
          ``1``, ``L`` and ``RGB`` (8 bit, ``/255``); ``P`` (palette, looked up);
          ``I;16`` and its byte orders (16 bit, ``/65535``); ``I`` (32-bit integers,
          read as 16-bit values, ``/65535``; refused outside ``0..65535``); ``F``
          (float, refused outside ``[0, 1]`` or not finite). Grayscale is copied to the
          three channels. An alpha channel (``LA``, ``RGBA``, ``PA``, a palette with
          transparency) is accepted only when every pixel is opaque, and then dropped;
          an image with transparent pixels is refused (flatten it onto the background
          the model should see). Every other mode (``CMYK``, ``YCbCr``, ``LAB``, ...) is
          refused: save it as RGB. A mask is read the same way; any nonzero pixel (in
          any channel, at any bit depth) marks the object.
        * **Names become valid MLflow metric keys.** Class names (``classes.txt``) and
          the context part of group names may use only ASCII letters, digits, ``_``,
          ``-``, ``.`` and inner spaces, at most 200 characters, and not ``.`` or ``..``
          (see :func:`name_problem`), so ``acc/<group>`` and ``context_gap/<class>``
          are accepted by MLflow after the audit; two groups that would share a metric
          key are refused.
        * **Groups and pairs agree with labels.** A group is ``<class>|<context>`` with
          exactly one ``|``; its class part must be the row's label. Rows sharing a
          ``pair`` id must have one label.
        * **One size.** Without ``transform`` every image has the first image's size;
          with one, images may differ and each is brought to ``transform.size`` right
          after it is decoded (:mod:`audit.probes.transform`; masks by nearest
          neighbour). The checks above hold on the files' own sizes, and
          ``max_total_pixels`` bounds both the stack (``N * H * W`` after the transform)
          and the pixels decoded (the files' own sizes, summed).

        Args:
            folder: the probe folder.
            max_pixels: the most pixels (width times height) of one image or mask, and of
                ``transform.size``.
            max_total_pixels: the most pixels of all images together (``N * H * W``), as
                held and as decoded.
            transform: bring images of any size to one (None: they must share one).

        Returns:
            The probe set.
        """
        pf = cls.open(folder, max_pixels=max_pixels, transform=transform)
        h, w = pf.size
        n = len(pf)
        if n * h * w > max_total_pixels:
            gb = n * h * w * 3 * 4 / 1e9
            raise ProbeSetError(
                f"{pf.manifest}: {n} images of {w}x{h} are {n * h * w} pixels in all ({gb:.1f} GB as "
                f"float32), above max_total_pixels={max_total_pixels}; use fewer or smaller probes "
                "or raise max_total_pixels"
            )
        decoded = pf.decoded_pixels
        if decoded > max_total_pixels:
            raise ProbeSetError(
                f"{pf.manifest}: the {n} image files are {decoded} pixels in all as decoded (their own "
                f"sizes, before probes.transform), above max_total_pixels={max_total_pixels}; use fewer "
                "or smaller files or raise max_total_pixels"
            )
        # Pass 2: decode into preallocated tensors (no second copy of the stack).
        x = torch.empty((n, 3, h, w), dtype=torch.float32)
        m = torch.empty((n, 1, h, w), dtype=torch.bool) if pf.has_masks else None
        for i in range(n):
            image, mask = _decode_row(pf.entries[i], pf.manifest, pf.transform, m is not None)
            x[i] = image
            if m is not None:
                m[i] = mask
        return cls(
            images=x,
            labels=pf.labels.clone(),
            class_names=list(pf.class_names),
            masks=m,
            groups=None if pf.groups is None else pf.groups.clone(),
            group_names=list(pf.group_names),
            pairs=None if pf.pairs is None else pf.pairs.clone(),
        )

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int = 0,
        transform: ProbeTransform | None = None,
        defer_size: bool = False,
    ) -> ProbeFolder:
        """Check a probe folder as :meth:`load` does and return it streamed: nothing is decoded.

        Pass 1 of :meth:`load` (paths inside the folder, regular files, image headers,
        sizes, names, groups and pairs against labels) runs in full, with the same
        errors; the pixels are read later, a batch at a time (:class:`ProbeFolder`).
        There is no ``max_total_pixels``: a streamed folder never holds the stack.

        Args:
            folder: the probe folder.
            max_pixels: the most pixels (width times height) of one image or mask, and of
                ``transform.size``.
            workers: DataLoader worker processes used by default for whole-folder passes
                (the digest); 0 reads in this process.
            transform: bring images of any size to one (None: they must share one).
            defer_size: with no ``transform``, open a folder of mixed sizes anyway and leave
                the size to :meth:`ProbeFolder.with_transform` (the audit job opens the
                folder before it knows the model's input size). Until then, anything
                that needs the size raises the error ``open`` gives without this flag.

        Returns:
            The :class:`ProbeFolder` (labels, groups, pairs and file entries in memory).

        Raises:
            ProbeSetError: the folder fails a check (one line naming file, row and fix).
        """
        one_size = transform is None and not defer_size
        pf = _scan(Path(folder), max_pixels, workers, one_size)
        return pf if defer_size and transform is None else pf.with_transform(transform)


# ---------------------------------------------------------------------- streamed folders
#: Packed mask bits of a streamed digest stay in memory up to this size, then spill to a temporary file.
_SPOOL_BYTES = 16 * 2**20


class ProbeFolder:
    """A checked probe folder read a batch at a time: the pixel stack is never held whole.

    Made by :meth:`ProbeSet.open`. It holds what :class:`ProbeSet` holds except the pixels:
    ``labels``, ``class_names``, ``masks is not None`` as ``has_masks``, ``groups`` and
    ``group_names``, ``pairs`` (the same tensors and meanings as :meth:`ProbeSet.load`
    gives for the folder), and one checked file entry per row. Pixels are decoded when
    asked for: :meth:`batches` streams rows through a ``torch.utils.data.DataLoader``
    (``num_workers`` processes decode, the order is kept), :meth:`subset` decodes some rows
    into an in-memory :class:`ProbeSet`, and ``images``/``masks`` decode the rows an index
    names (``probes.images[rows]``), so code written for a :class:`ProbeSet` that reads a
    bounded set of rows works unchanged.

    Memory: one batch per worker in flight (the DataLoader's prefetch of two), plus 8 bytes
    of metadata per row. The :attr:`digest` is the one :meth:`ProbeSet.load` would give,
    hashed while streaming; the mask bits, which the digest hashes after the labels, are
    packed (1/96 of the float32 images) into a temporary file that spills to disk above
    16 MB. The first full in-order pass of :meth:`batches` (the audit's predictions) also
    computes the digest and the mask shares, so an audit decodes each file once for them.

    With a :attr:`transform` (:mod:`audit.probes.transform`) the files may have any sizes:
    every image and mask is brought to ``transform.size`` right after it is decoded, and
    everything here (``size``, ``images``, the digest) is of the transformed probes.
    """

    def __init__(
        self,
        *,
        folder: Path,
        manifest: Path,
        entries: list[_Row],
        labels: torch.Tensor,
        class_names: list[str],
        has_masks: bool,
        groups: torch.Tensor | None,
        group_names: list[str],
        pairs: torch.Tensor | None,
        workers: int = 0,
        transform: ProbeTransform | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.folder, self.manifest, self.entries = folder, manifest, entries
        self.labels, self.class_names, self.has_masks = labels, class_names, has_masks
        self.groups, self.group_names, self.pairs = groups, group_names, pairs
        self.workers = int(workers)
        self.transform = transform
        self.max_pixels = int(max_pixels)
        self._size: tuple[int, int] | None = (
            transform.size if transform is not None else _one_size(entries)
        )
        self._digest: str | None = None
        self._shares: torch.Tensor | None = None

    def with_transform(self, transform: ProbeTransform | None) -> ProbeFolder:
        """The same checked rows read through ``transform`` (None: as the files are); no file is read.

        Raises:
            ProbeSetError: ``transform`` is None and the images differ in size (the message
                names the first image of another size and ``probes.transform.size`` as the
                fix), or ``transform.size`` is above :attr:`max_pixels`.
        """
        if transform is None and _one_size(self.entries) is None:
            raise ProbeSetError(_sizes_differ(self.entries, self.manifest))
        if transform is not None:
            th, tw = transform.size
            if th * tw > self.max_pixels:
                raise ProbeSetError(
                    f"{self.manifest}: probes.transform would make every image {tw}x{th} = {th * tw} pixels, "
                    f"above max_pixels={self.max_pixels}; set a smaller probes.transform.size (unset, the size "
                    "is the model's input size)"
                )
        return ProbeFolder(
            folder=self.folder,
            manifest=self.manifest,
            entries=self.entries,
            labels=self.labels,
            class_names=self.class_names,
            has_masks=self.has_masks,
            groups=self.groups,
            group_names=self.group_names,
            pairs=self.pairs,
            workers=self.workers,
            transform=transform,
            max_pixels=self.max_pixels,
        )

    @property
    def decoded_pixels(self) -> int:
        """Pixels of all image files as decoded (their own sizes, before any transform)."""
        return sum(e.width * e.height for e in self.entries)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        size = "mixed" if self._size is None else f"{self._size[0]}x{self._size[1]}"
        extras = [
            k
            for k, v in (
                ("masks", self.has_masks),
                ("groups", self.groups is not None),
                ("pairs", self.pairs is not None),
            )
            if v
        ]
        return f"ProbeFolder({str(self.folder)!r}, n={len(self)}, size={size}, classes={self.class_names}, with={extras})"

    @property
    def size(self) -> tuple[int, int]:
        """Image height and width (after the transform, if any).

        Raises:
            ProbeSetError: the files differ in size and no transform is set (a folder opened
                with ``defer_size=True`` before :meth:`with_transform`).
        """
        if self._size is None:
            raise ProbeSetError(_sizes_differ(self.entries, self.manifest))
        return self._size

    @property
    def images(self) -> _LazyRows:
        """The images as a lazy ``[N, 3, H, W]``: indexing decodes only the rows named."""
        return _LazyRows(self, "images")

    @property
    def masks(self) -> _LazyRows | None:
        """The masks as a lazy bool ``[N, 1, H, W]`` (None without a mask column)."""
        return _LazyRows(self, "masks") if self.has_masks else None

    def group_of(self, i: int) -> str | None:
        """The group name of row ``i``, or None without groups."""
        if self.groups is None:
            return None
        return self.group_names[int(self.groups[i])]

    def check_names(self) -> None:
        """As :meth:`ProbeSet.check_names` (already true for an opened folder)."""
        _check_names(self.class_names, self.group_names)

    # ------------------------------------------------------------------ reading
    def read(
        self, rows: Sequence[int] | torch.Tensor, *, images: bool = True, masks: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Decode ``rows`` in this process (a row named twice is decoded once).

        Args:
            rows: row indices (each ``0 <= i < len(self)``).
            images: decode the images.
            masks: decode the masks (when the folder has them).

        Returns:
            ``(images [k, 3, H, W] float32 or None, masks [k, 1, H, W] bool or None)``.

        Raises:
            ProbeSetError: a file fails to decode (the message names it and its row).
        """
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        unique, inverse = torch.unique(idx, return_inverse=True)
        h, w = self.size
        want = masks and self.has_masks
        x = torch.empty((len(unique), 3, h, w), dtype=torch.float32) if images else None
        m = torch.empty((len(unique), 1, h, w), dtype=torch.bool) if want else None
        for j, i in enumerate(unique.tolist()):
            e = self.entries[i]
            where = f"{self.manifest}, row {e.line}"
            if x is not None:
                x[j] = _decode_image(e, where, self.transform)
            if m is not None:
                m[j] = _decode_mask(e, where, self.transform)
        if len(unique) != len(idx) or not torch.equal(unique, idx):
            x = None if x is None else x[inverse]
            m = None if m is None else m[inverse]
        return x, m

    def subset(self, index: Sequence[int] | torch.Tensor) -> ProbeSet:
        """The rows ``index`` decoded into an in-memory :class:`ProbeSet` (group names and classes kept)."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        x, m = self.read(idx)
        assert x is not None
        return ProbeSet(
            images=x,
            labels=self.labels[idx],
            class_names=list(self.class_names),
            masks=m,
            groups=None if self.groups is None else self.groups[idx],
            group_names=list(self.group_names),
            pairs=None if self.pairs is None else self.pairs[idx],
        )

    def batches(
        self,
        rows: Sequence[int] | torch.Tensor | None = None,
        batch_size: int = 128,
        *,
        workers: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The images of ``rows`` (None: every row, in order) as ``(rows, images)`` batches, streamed.

        Consecutive pieces of ``rows`` of at most ``batch_size``, decoded by a
        ``DataLoader`` with ``workers`` processes (None: :attr:`workers`; 0 decodes here),
        in order. A full pass (``rows=None``) run to its end also fixes :attr:`digest` and
        :meth:`mask_shares` when they are not known yet, from the same decoded files.

        Raises:
            ProbeSetError: a file fails to decode; one line naming the file and its row.
        """
        workers = self.workers if workers is None else workers
        full = rows is None
        digest = _DigestStream(self) if full and self._digest is None else None
        shares: list[torch.Tensor] | None = (
            [] if full and self.has_masks and self._shares is None else None
        )
        with_masks = digest is not None or shares is not None
        for part, x, m in self._stream(rows, batch_size, workers, with_masks):
            if digest is not None:
                digest.add(part, x, m)
            if shares is not None:
                assert m is not None
                shares.append(m.flatten(1).float().mean(dim=1))
            yield part, x
        if digest is not None:
            self._digest = digest.finish()
        if shares is not None:
            self._shares = torch.cat(shares) if shares else torch.empty(0)

    def _stream(
        self,
        rows: Sequence[int] | torch.Tensor | None,
        batch_size: int,
        workers: int,
        with_masks: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(rows, images, masks or None)`` through a DataLoader; worker errors become one line."""
        index = (
            torch.arange(len(self))
            if rows is None
            else torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(
                f"rows must lie in 0..{len(self) - 1}; got {int(index.min())}..{int(index.max())}"
            )
        if self._size is None:  # mixed sizes and no transform (opened with defer_size)
            raise ProbeSetError(_sizes_differ(self.entries, self.manifest))
        dataset = _RowDataset(
            self.entries, self.manifest, self.transform, with_masks and self.has_masks
        )
        # The DataLoader batches a list of row indices: one worker decodes a whole batch
        # (torch's default fetcher, in order). Errors come back as values, not exceptions:
        # torch wraps a worker's exception in a multi-line traceback text.
        loader = DataLoader(
            _Indexed(dataset, index.tolist()),
            batch_size=max(int(batch_size), 1),
            shuffle=False,
            num_workers=max(int(workers), 0),
            collate_fn=_collate,
        )
        try:
            for batch in loader:
                if batch["error"] is not None:
                    raise ProbeSetError(batch["error"])
                yield batch["rows"], batch["images"], batch["masks"]
        except (
            RuntimeError
        ) as err:  # a worker died (killed, out of memory): one line, not torch's text
            # torch's text: "Caught X in DataLoader worker process 0.", the traceback, the error last
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [
                type(err).__name__
            ]
            cause = lines[-1][:300]
            raise ProbeSetError(
                f"{self.manifest}: reading the probe images with {workers} worker process(es) failed: {cause}; "
                "retry with engine.workers=0 to read them in the main process"
            ) from None

    # ------------------------------------------------------------------ identity
    @property
    def digest(self) -> str:
        """:attr:`ProbeSet.digest` of the loaded folder, hashed streaming (cached).

        Computed by a full pass of :meth:`batches` with :attr:`workers` unless one ran.
        """
        return self.compute_digest()

    def compute_digest(self, batch_size: int = 128, workers: int | None = None) -> str:
        """:attr:`digest`, by a full pass of :meth:`batches` unless one already ran to its end.

        Args:
            batch_size: rows per batch (the memory of the pass; the digest does not depend on it).
            workers: DataLoader worker processes (None: :attr:`workers`).

        Returns:
            The hex SHA-256, equal to ``ProbeSet.load(folder).digest``.

        Raises:
            ProbeSetError: a file fails to decode.
        """
        if self._digest is None:
            for _ in self.batches(None, batch_size, workers=workers):
                pass
        assert self._digest is not None
        return self._digest

    def mask_shares(self, batch_size: int = 128, workers: int | None = None) -> torch.Tensor:
        """Per row the share of its mask that marks the object, float32 ``[N]`` (cached).

        Equal to ``masks.flatten(1).float().mean(dim=1)`` on the loaded set.

        Raises:
            ValueError: the folder has no mask column.
        """
        if not self.has_masks:
            raise ValueError("the probe folder has no mask column")
        if self._shares is None:
            for _ in self.batches(None, batch_size, workers=workers):
                pass
        assert self._shares is not None
        return self._shares


class _LazyRows:
    """``ProbeFolder.images`` / ``.masks``: a tensor-like whose indexing decodes the rows named."""

    def __init__(self, folder: ProbeFolder, kind: str) -> None:
        self._folder, self._kind = folder, kind
        h, w = folder.size
        self.shape = torch.Size((len(folder), 3 if kind == "images" else 1, h, w))
        self.dtype = torch.float32 if kind == "images" else torch.bool

    def __len__(self) -> int:
        return int(self.shape[0])

    def __repr__(self) -> str:
        return f"<lazy {self._kind} {tuple(self.shape)} of {self._folder.folder}>"

    def __getitem__(self, key: object) -> torch.Tensor:
        n = len(self)
        single = False
        if isinstance(key, slice):
            rows = list(range(*key.indices(n)))
        elif isinstance(key, (int, np.integer)) or (
            isinstance(key, torch.Tensor) and key.ndim == 0
        ):
            i = int(key)  # type: ignore[arg-type]
            if not -n <= i < n:
                raise IndexError(f"row {i} is out of range for {n} probes")
            rows, single = [i % n], True
        else:
            t = torch.as_tensor(key) if not isinstance(key, torch.Tensor) else key
            if t.dtype == torch.bool:
                if t.shape != (n,):
                    raise IndexError(
                        f"a boolean row index must have shape [{n}]; got {tuple(t.shape)}"
                    )
                t = t.nonzero().flatten()
            if t.ndim != 1 or t.is_floating_point():
                raise TypeError(
                    f"lazy {self._kind} take one row index (int, slice, list or 1-D LongTensor); got {key!r:.80}"
                )
            rows = [int(i) for i in t.tolist()]
            bad = [i for i in rows if not -n <= i < n]
            if bad:
                raise IndexError(f"row {bad[0]} is out of range for {n} probes")
            rows = [i % n for i in rows]
        x, m = self._folder.read(rows, images=self._kind == "images", masks=self._kind == "masks")
        out = x if self._kind == "images" else m
        assert out is not None
        return out[0] if single else out


class _RowDataset:
    """Decodes one manifest row (image, and mask when asked) into tensors; picklable for workers."""

    def __init__(
        self, entries: list[_Row], manifest: Path, transform: ProbeTransform | None, masks: bool
    ) -> None:
        self.entries, self.manifest, self.transform, self.masks = (
            entries,
            manifest,
            transform,
            masks,
        )

    def __call__(self, i: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        try:
            image, mask = _decode_row(self.entries[i], self.manifest, self.transform, self.masks)
        except ProbeSetError as err:
            return i, None, None, str(err)
        except Exception as err:  # noqa: BLE001 - any failure on a hostile file: one line naming it
            e = self.entries[i]
            return i, None, None, _unreadable(e.rel, f"{self.manifest}, row {e.line}", "image", err)
        return i, image, mask, None


class _Indexed(Dataset):
    """The dataset of ``rows`` (positions into the folder), in order."""

    def __init__(self, rows_dataset: _RowDataset, rows: list[int]) -> None:
        self.data, self.rows = rows_dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        return self.data(self.rows[k])


def _collate(items: list) -> dict[str, object]:
    """Stack a batch; the first row that failed to decode becomes the batch's ``error``."""
    for *_, err in items:
        if err is not None:
            return {"error": err}
    rows = torch.tensor([i for i, *_ in items], dtype=torch.long)
    images = default_collate(
        [image for _, image, _, _ in items]
    )  # in a worker: straight into shared memory
    masks = default_collate([m for _, _, m, _ in items]) if items[0][2] is not None else None
    return {"error": None, "rows": rows, "images": images, "masks": masks}


def _decode_row(
    e: _Row, manifest: Path, transform: ProbeTransform | None, masks: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row ``e`` decoded (and transformed): image float32 ``[3, H, W]`` and, when asked, its mask bool ``[1, H, W]``."""
    where = f"{manifest}, row {e.line}"
    return _decode_image(e, where, transform), (
        _decode_mask(e, where, transform) if masks else None
    )


def _decode_image(e: _Row, where: str, transform: ProbeTransform | None) -> torch.Tensor:
    """Row ``e``'s image as float32 ``[3, H, W]``: decoded at its own size, then transformed."""
    pix = _decode(e.image, e.rel, where, "image", (e.width, e.height))
    image = torch.from_numpy(pix).permute(2, 0, 1)
    return (image if transform is None else transform.image(image)).contiguous()


def _decode_mask(e: _Row, where: str, transform: ProbeTransform | None) -> torch.Tensor:
    """Row ``e``'s mask as bool ``[1, H, W]``: any nonzero channel marks the object (then transformed)."""
    assert e.mask is not None and e.mask_rel is not None
    pix = _decode(e.mask, e.mask_rel, where, "mask", (e.width, e.height))
    mask = torch.from_numpy(np.ascontiguousarray((pix > 0).any(axis=2)))[None]
    return mask if transform is None else transform.mask(mask)


def _one_size(entries: Sequence[_Row]) -> tuple[int, int] | None:
    """``(height, width)`` shared by every row's image, or None when they differ."""
    sizes = {(e.height, e.width) for e in entries}
    return next(iter(sizes)) if len(sizes) == 1 else None


def _sizes_differ(entries: Sequence[_Row], manifest: Path) -> str:
    """The one-line error for images of several sizes and no transform: the first that differs."""
    first = entries[0]
    other = next(e for e in entries if (e.width, e.height) != (first.width, first.height))
    return (
        f"{manifest}, row {other.line}: image {_q(other.rel)} is {other.width}x{other.height} but {_q(first.rel)} "
        f"is {first.width}x{first.height}; all probe images must have one size: set probes.transform.size=<n> "
        "(e.g. probes.transform.size=224; ProbeTransform(224) in Python) to resize and centre-crop every "
        "image to n x n, or resize the files"
    )


class _DigestStream:
    """:attr:`ProbeSet.digest` fed a batch at a time, in row order.

    The in-memory digest hashes the images, then labels and classes, then the mask bits
    packed over the whole stack (one ``np.packbits``, so an image's bits continue in the
    byte its predecessor left unfinished when ``H * W`` is not a multiple of 8). Here the
    bits are packed as they come, the unfinished byte's bits carried to the next batch,
    into a spooled temporary file hashed after the labels.
    """

    def __init__(self, folder: ProbeFolder) -> None:
        self.folder = folder
        n, (h, w) = len(folder), folder.size
        self.h = hashlib.sha256(_DIGEST_VERSION)
        _put(self.h, "shape", np.asarray((n, 3, h, w), dtype="<i8").tobytes())
        _put_head(self.h, "images", n * 3 * h * w * 4)
        self.next = 0
        self.bits = (
            tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) if folder.has_masks else None
        )
        self.carry = np.zeros(0, dtype=np.uint8)

    def add(self, rows: torch.Tensor, images: torch.Tensor, masks: torch.Tensor | None) -> None:
        k = int(rows.numel())
        if k == 0:
            return
        if int(rows[0]) != self.next or int(rows[-1]) != self.next + k - 1:
            raise RuntimeError("the streamed digest needs every row once, in order")
        self.next += k
        self.h.update(np.ascontiguousarray(images.numpy(), dtype="<f4"))
        if self.bits is not None:
            assert masks is not None
            bits = np.concatenate([self.carry, masks.numpy().reshape(-1).astype(np.uint8)])
            whole = bits.size - bits.size % 8
            self.bits.write(np.packbits(bits[:whole]).tobytes())
            self.carry = bits[whole:]

    def finish(self) -> str:
        f = self.folder
        if self.next != len(f):
            raise RuntimeError(f"the streamed digest saw {self.next} of {len(f)} rows")
        _put(self.h, "labels", f.labels.cpu().numpy().astype("<i8").tobytes())
        _put(self.h, "classes", "\n".join(f.class_names).encode())
        if self.bits is not None:
            h, w = f.size
            _put_head(self.h, "masks", (len(f) * h * w + 7) // 8)
            self.bits.seek(0)
            while chunk := self.bits.read(2**20):
                self.h.update(chunk)
            self.bits.close()
            if self.carry.size:
                self.h.update(np.packbits(self.carry).tobytes())
        if f.groups is not None:
            _put(self.h, "groups", "\n".join(f.group_names[int(g)] for g in f.groups).encode())
        if f.pairs is not None:
            _put(self.h, "pairs", _first_appearance(f.pairs).numpy().astype("<i8").tobytes())
        return self.h.hexdigest()


def _put_head(h, tag: str, length: int) -> None:
    """The tag and length that precede a payload in the digest (see :attr:`ProbeSet.digest`)."""
    h.update(tag.encode())
    h.update(int(length).to_bytes(8, "little"))


def _put(h, tag: str, payload: bytes) -> None:
    _put_head(h, tag, len(payload))
    h.update(payload)


def _check_names(class_names: Sequence[str], group_names: Sequence[str]) -> None:
    """:meth:`ProbeSet.check_names` on plain name lists."""
    for i, c in enumerate(class_names):
        problem = name_problem(c)
        if problem:
            raise ProbeSetError(f"class_names[{i}] = {_q(c)} {problem}; {NAME_RULE}")
    class_index = {c: i for i, c in enumerate(class_names)}
    keys: dict[str, str] = {}
    for i, g in enumerate(group_names):
        problem = _group_problem(g, class_index, None)
        if problem:
            raise ProbeSetError(f"group_names[{i}]: {problem}")
        key = metric_key("acc", g)
        if keys.setdefault(key, g) != g:
            raise ProbeSetError(
                f"groups {_q(keys[key])} and {_q(g)} both become the MLflow metric key "
                f"{_q(key)}; rename one of them"
            )


def _scan(folder: Path, max_pixels: int, workers: int, one_size: bool) -> ProbeFolder:
    """Pass 1 of :meth:`ProbeSet.load` (text, paths, headers; nothing decoded) as a :class:`ProbeFolder`.

    ``one_size``: no transform will follow, so an image of another size than the first is
    refused at its row, before its mask is looked at.
    """
    if not folder.is_dir():
        raise ProbeSetError(f"probe folder {folder} does not exist or is not a folder")
    try:
        root = folder.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ProbeSetError(f"probe folder {folder} cannot be resolved: {e}") from None
    classes_path = folder / "classes.txt"
    manifest = folder / "manifest.csv"
    class_names = _read_classes(classes_path, _top_file(root, classes_path, _CLASSES_HINT))
    header, rows = _read_manifest(manifest, _top_file(root, manifest, _MANIFEST_HINT))
    class_index = {c: i for i, c in enumerate(class_names)}

    # Pass 1: text, paths and image headers only; nothing is decoded yet.
    entries: list[_Row] = []
    seen: dict[Path, tuple[int, str]] = {}
    group_first: dict[str, int] = {}
    group_keys: dict[str, tuple[str, int]] = {}
    pair_first: dict[str, tuple[int, str]] = {}
    for line, row in rows:
        where = f"{manifest}, row {line}"
        rel = row["image"].strip()
        if not rel:
            raise ProbeSetError(f"{where}: the 'image' cell is empty")
        label = row["label"].strip()
        if label not in class_index:
            raise ProbeSetError(
                f"{where}: label {_q(label)} is not in classes.txt ({', '.join(class_names)}); "
                "fix the label or add the class to classes.txt"
            )
        image = _inside(root, folder, rel, where, "image")
        if image in seen:
            r0, rel0 = seen[image]
            same = "" if rel0 == rel else f" (as {_q(rel0)})"
            raise ProbeSetError(
                f"{where}: duplicate row: image {_q(rel)} is already listed in row {r0}{same}; "
                "list each image once"
            )
        seen[image] = (line, rel)
        w, h = _header(image, rel, where, "image", max_pixels)
        entry = _Row(line, rel, image, class_index[label], width=w, height=h)
        if one_size and entries and (w, h) != (entries[0].width, entries[0].height):
            raise ProbeSetError(_sizes_differ([entries[0], entry], manifest))
        if "mask" in header:
            mrel = row["mask"].strip()
            if not mrel:
                raise ProbeSetError(
                    f"{where}: the 'mask' cell is empty; give every row a mask or drop the column"
                )
            entry.mask_rel, entry.mask = mrel, _inside(root, folder, mrel, where, "mask")
            mw, mh = _header(entry.mask, mrel, where, "mask", max_pixels)
            if (mh, mw) != (h, w):
                raise ProbeSetError(
                    f"{where}: mask {_q(mrel)} is {mw}x{mh} but its image {_q(rel)} is {w}x{h}; "
                    "a mask must match its image"
                )
        if "group" in header:
            g = row["group"].strip()
            if not g:
                raise ProbeSetError(
                    f"{where}: the 'group' cell is empty; give every row a group or drop the column"
                )
            problem = _group_problem(g, class_index, label)
            if problem:
                raise ProbeSetError(f"{where}: {problem}")
            key = metric_key("acc", g)
            if key in group_keys and group_keys[key][0] != g:
                g0, r0 = group_keys[key]
                raise ProbeSetError(
                    f"{where}: groups {_q(g)} and {_q(g0)} (row {r0}) both become the MLflow "
                    f"metric key {_q(key)}; rename one of them"
                )
            group_keys.setdefault(key, (g, line))
            group_first.setdefault(g, len(group_first))
            entry.group = g
        if "pair" in header:
            p = row["pair"].strip()
            if p:
                if p in pair_first and pair_first[p][1] != label:
                    r0, l0 = pair_first[p]
                    raise ProbeSetError(
                        f"{where}: pair {_q(p)} joins this row (label {_q(label)}) with row {r0} "
                        f"(label {_q(l0)}); the rows of a pair show one object, so they share a "
                        "label: fix the pair id or the label"
                    )
                pair_first.setdefault(p, (line, label))
            entry.pair = p
        entries.append(entry)

    groups = None
    group_names: list[str] = []
    if "group" in header:
        group_names = list(group_first)
        groups = torch.tensor([group_first[e.group] for e in entries], dtype=torch.long)
    pairs = None
    if "pair" in header:
        # An empty pair cell means "no partner": give the row an id of its own.
        ids: dict[str, int] = {}
        values = []
        for j, e in enumerate(entries):
            k = e.pair if e.pair else f"\0unpaired{j}"
            values.append(ids.setdefault(k, len(ids)))
        pairs = torch.tensor(values, dtype=torch.long)
    return ProbeFolder(
        folder=folder,
        manifest=manifest,
        entries=entries,
        labels=torch.tensor([e.label for e in entries], dtype=torch.long),
        class_names=class_names,
        has_masks="mask" in header,
        groups=groups,
        group_names=group_names,
        pairs=pairs,
        workers=workers,
        max_pixels=max_pixels,
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


_CLASSES_HINT = "write one class name per line (line i = model output i)"
_MANIFEST_HINT = "write a CSV with the header image,label[,mask][,group][,pair]"


@dataclass
class _Row:
    """One manifest row after pass 1 (checked, not decoded)."""

    line: int
    rel: str
    image: Path
    label: int
    width: int = 0  # the image's size from its header (its mask has the same)
    height: int = 0
    mask_rel: str | None = None
    mask: Path | None = None
    group: str = ""
    pair: str = ""


def _q(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message: printable, at most ``limit`` characters."""
    s = str(text)
    short = s if len(s) <= limit else s[:limit] + "..."
    if short.isprintable() and "'" not in short:
        return f"'{short}'"
    return repr(short)


def _top_file(root: Path, path: Path, hint: str) -> Path:
    """``classes.txt`` or ``manifest.csv``: a regular file inside the folder, not too large."""
    if not os.path.lexists(path):
        raise ProbeSetError(f"{path} is missing; {hint}")
    real = _resolve_inside(root, path, str(path), path.name)
    size = real.stat().st_size
    if size > _MAX_TEXT_BYTES:
        raise ProbeSetError(
            f"{path} is {size} bytes, above the limit of {_MAX_TEXT_BYTES} bytes for a probe "
            "folder's text files; split the probe set"
        )
    return real


def _inside(root: Path, folder: Path, rel: str, where: str, what: str) -> Path:
    """The resolved path of manifest cell ``rel``: a regular file inside ``root``."""
    if any(not ch.isprintable() for ch in rel):
        raise ProbeSetError(
            f"{where}: {what} path {_q(rel)} has a control character; rename the file"
        )
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ProbeSetError(
            f"{where}: path {_q(rel)} must be relative to the probe folder, inside it"
        )
    path = folder / p
    if not os.path.lexists(path):
        raise ProbeSetError(f"{where}: file {_q(rel)} does not exist (looked for {path})")
    return _resolve_inside(root, path, where, f"{what} {_q(rel)}")


def _resolve_inside(root: Path, path: Path, where: str, what: str) -> Path:
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise ProbeSetError(
            f"{where}: {what} is a symbolic link to a missing file; copy the file into the probe folder"
        ) from None
    except (OSError, RuntimeError) as e:
        raise ProbeSetError(f"{where}: {what} cannot be resolved ({e}); use a plain file") from None
    if not real.is_relative_to(root):
        raise ProbeSetError(
            f"{where}: {what} leads outside the probe folder (to {real}); symbolic links must stay "
            "inside the folder: copy the file in"
        )
    try:
        mode = real.stat().st_mode
    except OSError as e:
        raise ProbeSetError(f"{where}: {what} cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise ProbeSetError(f"{where}: {what} is not a regular file; list plain files only")
    return real


def _open_regular(real: Path):
    """A binary file object for ``real``, refusing a last-moment swap for a link or a non-file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(real, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{real} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_text(path: Path, real: Path) -> str:
    try:
        with _open_regular(real) as fh:
            data = fh.read(_MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise ProbeSetError(f"{path} cannot be read: {e}") from None
    if len(data) > _MAX_TEXT_BYTES:
        raise ProbeSetError(
            f"{path} is above the limit of {_MAX_TEXT_BYTES} bytes; split the probe set"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProbeSetError(f"{path} cannot be read as UTF-8 text: {e}") from None


def _read_classes(path: Path, real: Path) -> list[str]:
    lines = _read_text(path, real).splitlines()
    names = [ln.strip() for ln in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ProbeSetError(f"{path} is empty; {_CLASSES_HINT}")
    for i, c in enumerate(names, start=1):
        if not c:
            raise ProbeSetError(
                f"{path}, line {i}: empty class name; every line up to the last needs a name"
            )
        problem = name_problem(c)
        if problem:
            raise ProbeSetError(f"{path}, line {i}: class name {_q(c)} {problem}; {NAME_RULE}")
    seen: dict[str, int] = {}
    for i, c in enumerate(names, start=1):
        if c in seen:
            raise ProbeSetError(
                f"{path}, line {i}: class name {_q(c)} is already on line {seen[c]}; class names must be unique"
            )
        seen[c] = i
    return names


def _read_manifest(path: Path, real: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    text = _read_text(path, real)
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise ProbeSetError(
                f"{path} is empty; it needs the header image,label[,mask][,group][,pair]"
            )
        header = [h.strip().lower() for h in header]
        missing = [c for c in _REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ProbeSetError(
                f"{path}: header {_q(','.join(header))} lacks the required column(s) "
                f"{', '.join(missing)}; the header is image,label[,mask][,group][,pair]"
            )
        unknown = [c for c in header if c not in _REQUIRED_COLUMNS + _OPTIONAL_COLUMNS]
        if unknown:
            raise ProbeSetError(
                f"{path}: unknown column(s) {_q(', '.join(unknown))[1:-1]}; allowed columns are "
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
    if not rows:
        raise ProbeSetError(f"{path} lists no images; add one row per probe image")
    return header, rows


# ---------------------------------------------------------------------- names
def name_problem(name: str) -> str | None:
    """Why ``name`` (a class name, or a group's context) cannot be used, or None when it can.

    Names end up in MLflow metric keys (``acc/<class>|<context>``, ``context_gap/<class>``).
    MLflow refuses characters outside letters, digits, ``_ - . / :`` and space, keys
    that change under path normalisation (``a/./b``, ``a//b``, a trailing ``/``,
    ``..``) and keys over 250 characters. A name here may use only ASCII letters,
    digits, ``_``, ``-``, ``.`` and inner single spaces (no ``/``: it would nest keys),
    is 1 to 200 characters long and is not ``.`` or ``..``. Such names pass
    :func:`audit.gate.tracking.metric_key` unchanged, so distinct names give distinct keys.
    """
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long, above {MAX_NAME_LENGTH}"
    bad = _BAD_NAME_CHAR.search(name)
    if bad:
        ch = bad.group()
        return f"has the character {ch!r} (U+{ord(ch):04X})"
    if name != name.strip() or "  " in name:
        return "has a leading, trailing or double space"
    if name in (".", ".."):
        return f"is {name!r}, which MLflow reads as a path"
    return None


def _group_problem(group: str, class_index: Mapping[str, int], label: str | None) -> str | None:
    """Why group name ``group`` is refused (for a row labelled ``label``), or None."""
    if len(group) > MAX_NAME_LENGTH:
        return (
            f"group {_q(group)} is {len(group)} characters long, above {MAX_NAME_LENGTH}; "
            "shorten it (it becomes an MLflow metric key)"
        )
    if group.count("|") != 1:
        what = "has no '|'" if "|" not in group else "has more than one '|'"
        return f"group {_q(group)} {what}; name groups '<class>|<context>' (e.g. 'wolf|snow')"
    cls, ctx = group.split("|")
    if cls not in class_index:
        return (
            f"group {_q(group)} names class {_q(cls)}, which is not a class "
            f"({', '.join(class_index)}); a group is '<class>|<context>'"
        )
    if label is not None and cls != label:
        return (
            f"group {_q(group)} is of class {_q(cls)} but the row's label is {_q(label)}; "
            "a group holds rows of its own class only: fix the label or the group"
        )
    problem = name_problem(ctx)
    if problem:
        return f"group {_q(group)}: its context {_q(ctx)} {problem}; {NAME_RULE}"
    return None


# ---------------------------------------------------------------------- images
def _open_image(fh, rel: str, where: str, what: str) -> Image.Image:
    """``Image.open`` (header only) with decompression bombs turned into one clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fh, formats=_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ProbeSetError(_bomb(rel, where, what)) from None
    except Exception as e:  # any parser failure on a hostile file is a bad file
        raise ProbeSetError(_unreadable(rel, where, what, e)) from None


def _bomb(rel: str, where: str, what: str) -> str:
    return (
        f"{where}: {what} {_q(rel)} claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels "
        "(refused as a decompression bomb before decoding); downscale it"
    )


def _unreadable(rel: str, where: str, what: str, e: BaseException) -> str:
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    return (
        f"{where}: file {_q(rel)} cannot be read as an image (PNG, JPEG, BMP, TIFF or WebP "
        f"expected): {detail}; re-export the file or drop its row"
    )


def _header(real: Path, rel: str, where: str, what: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the file's header, after checking size, mode and frames."""
    try:
        fh = _open_regular(real)
    except OSError as e:
        raise ProbeSetError(f"{where}: {what} {_q(rel)} cannot be opened: {e}") from None
    with fh, _open_image(fh, rel, where, what) as im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ProbeSetError(f"{where}: {what} {_q(rel)} is {w}x{h}: it has no pixels")
        if w * h > max_pixels:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} is {w}x{h} = {w * h} pixels, above max_pixels="
                f"{max_pixels} (checked from the header, not decoded); downscale it or raise max_pixels"
            )
        if im.mode not in _MODES:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} has PIL mode {im.mode}, which cannot be read without "
                "changing its values; save it as RGB or grayscale (8 or 16 bit)"
            )
        frames = getattr(im, "n_frames", 1)
        if frames != 1:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} has {frames} frames; a probe is one still image: "
                "save one frame"
            )
    return w, h


def _decode(real: Path, rel: str, where: str, what: str, size: tuple[int, int]) -> np.ndarray:
    """The pixels as float32 ``[H, W, 3]`` in ``[0, 1]``, values kept (see :meth:`ProbeSet.load`)."""
    try:
        fh = _open_regular(real)
    except OSError as e:
        raise ProbeSetError(f"{where}: {what} {_q(rel)} cannot be opened: {e}") from None
    with fh, _open_image(fh, rel, where, what) as im:
        if im.size != size or im.mode not in _MODES:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} changed while the folder was read; load it again"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except Image.DecompressionBombError:
            raise ProbeSetError(_bomb(rel, where, what)) from None
        except Exception as e:  # a truncated or corrupt file
            raise ProbeSetError(_unreadable(rel, where, what, e)) from None
        return _pixels(im, rel, where, what)


def _pixels(im: Image.Image, rel: str, where: str, what: str) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):
        alpha = (
            mode == "PA" or "transparency" in im.info or getattr(im.palette, "mode", "") == "RGBA"
        )
        im = im.convert("RGBA" if alpha else "RGB")  # a palette lookup: values kept
        mode = im.mode
    elif mode == "1":
        im = im.convert("L")  # 0 or 255
        mode = "L"
    arr = np.asarray(im)
    if mode in ("LA", "RGBA"):
        if (arr[..., -1] != 255).any():
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} (mode {im.mode}) has transparent pixels, whose colour the "
                "model would see without their background; flatten it onto a background (save as RGB)"
            )
        arr = arr[..., :-1]
    if mode in ("L", "LA", "RGB", "RGBA"):
        out = arr.astype(np.float32) / np.float32(255.0)
    elif mode in _GRAY16:
        out = arr.astype(np.float32) / np.float32(65535.0)
    elif mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} (mode I) has values in [{lo}, {hi}], outside the 16-bit "
                "range 0..65535; save it as 8- or 16-bit grayscale"
            )
        out = arr.astype(np.float32) / np.float32(65535.0)
    else:  # "F"
        out = arr.astype(np.float32)
        if not np.isfinite(out).all() or float(out.min()) < 0.0 or float(out.max()) > 1.0:
            raise ProbeSetError(
                f"{where}: {what} {_q(rel)} (mode F) has values outside [0, 1] or NaN/Inf; "
                "scale it to [0, 1]"
            )
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)
