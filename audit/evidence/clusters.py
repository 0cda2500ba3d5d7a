"""SpRAy-style clustering of attribution maps, one class at a time.

Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans
predictors and assessing what machines really learn") groups the explanations of
one class by shape, so that a human can look at a handful of *strategies* instead
of hundreds of heatmaps. A class whose maps split into a large cluster on the
object and a smaller one on, say, a watermark is the classic Clever Hans finding.
The audit gate uses it when a probe set has labels only (no masks, groups or
pairs): the clusters are reported for review and the verdict is INCONCLUSIVE.

For each class with at least two maps, :func:`cluster_maps`

1. keeps the **positive part** of each map (relevance *for* the class, the same
   convention as the attribution evidence in :mod:`audit.pipeline`; for unsigned
   methods such as saliency this changes nothing), downsamples it to
   ``size x size`` by adaptive average pooling and scales it to unit sum, so that
   the clustering compares *where* the relevance is, not how much there is. A map
   with no positive relevance becomes the uniform map (no NaN);
2. builds a symmetric binary k-nearest-neighbour graph on the Euclidean distances
   (``neighbours`` per map, capped at ``n - 1``; an edge when either end lists the
   other; ties broken by row order);
3. takes the eigenvalues ``l_1 <= l_2 <= ...`` of the normalized Laplacian
   ``I - D^-1/2 A D^-1/2`` (``torch.linalg.eigh`` in float64) and chooses the
   number of clusters ``k`` in ``1..max_clusters`` (at most ``n - 1``) with the
   largest eigengap ``l_{k+1} - l_k`` (gaps rounded to 1e-9, ties to the smaller
   ``k``);
4. embeds each map as its row of the first ``k`` eigenvectors, scaled to unit
   length (Ng, Jordan & Weiss 2001), and runs k-means with k-means++ seeding
   (several restarts, the lowest inertia wins).

All randomness comes from a private :class:`torch.Generator` seeded with ``seed``
(afresh for every class, so a class's clusters do not depend on the other classes
present); the global RNG is never touched, and the same inputs and seed give the
same clusters. Cost is dominated by the dense eigendecomposition, O(n^3) in the
number of maps of a class, which is fine for probe sets of a few thousand images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["Cluster", "cluster_maps"]

_KMEANS_RESTARTS = 10
_KMEANS_MAX_ITER = 100
_GAP_DECIMALS = 9


@dataclass(frozen=True)
class Cluster:
    """One cluster of attribution maps within one class.

    Attributes:
        class_index: Index of the class in ``class_names``.
        class_name: ``class_names[class_index]``.
        cluster: Number of the cluster within its class, ``0..k-1``, ordered by
            size descending (ties: the cluster holding the smaller row first).
        size: Number of maps in the cluster.
        members: Row indices into the ``maps`` passed to :func:`cluster_maps`,
            ascending.
        eigengap: The eigengap ``l_{k+1} - l_k`` that chose ``k`` for this class
            (the same for every cluster of the class); ``0.0`` for a class with a
            single map, where nothing was chosen.
    """

    class_index: int
    class_name: str
    cluster: int
    size: int
    members: list[int]
    eigengap: float

    def to_dict(self) -> dict:
        """Return the cluster as plain JSON-ready types (ints, str, float, list)."""
        out = asdict(self)
        out["members"] = [int(m) for m in self.members]
        out["eigengap"] = float(self.eigengap)
        return out


def cluster_maps(
    maps: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    *,
    max_clusters: int = 4,
    size: int = 16,
    neighbours: int = 10,
    seed: int = 0,
) -> list[Cluster]:
    """Cluster the attribution maps of each class into distinct strategies.

    Args:
        maps: Attribution maps ``[N, 1, H, W]``, any sign (the positive part is
            used), finite.
        labels: Class index of each map, integer ``[N]``, in
            ``0..len(class_names)-1``.
        class_names: Name of each class.
        max_clusters: Largest number of clusters per class (>= 1).
        size: Side of the pooled maps that are compared (>= 1).
        neighbours: Neighbours per map in the affinity graph (>= 1; capped at the
            number of maps of the class minus one).
        seed: Seed of the private generator used by k-means++.

    Returns:
        The clusters, sorted by ``class_index`` then ``cluster``. Classes without
        maps have no clusters; a class with one map has one cluster of size 1.

    Raises:
        ValueError: If a shape, label or parameter is invalid; the message names
            the problem and the fix.
    """
    _check_inputs(maps, labels, class_names, max_clusters, size, neighbours)
    if maps.shape[0] == 0:
        return []
    features = _features(maps, size)
    labels = labels.to(torch.int64).cpu()

    clusters: list[Cluster] = []
    for class_index in sorted({int(v) for v in labels.tolist()}):
        rows = torch.nonzero(labels == class_index).flatten()
        name = str(class_names[class_index])
        if rows.numel() == 1:
            clusters.append(Cluster(class_index, name, 0, 1, [int(rows[0])], 0.0))
            continue
        assignment, gap = _spectral(features[rows], max_clusters, neighbours, seed)
        groups = [rows[assignment == c].tolist() for c in torch.unique(assignment).tolist()]
        groups.sort(key=lambda g: (-len(g), g[0]))
        for number, members in enumerate(groups):
            clusters.append(Cluster(class_index, name, number, len(members), sorted(members), gap))
    return clusters


def _check_inputs(
    maps: object,
    labels: object,
    class_names: Sequence[str],
    max_clusters: int,
    size: int,
    neighbours: int,
) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] != 1:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(
            f"maps must be a tensor of shape [N, 1, H, W] (one channel), got {got}; "
            "sum or average the channels of the attributions first, e.g. maps.sum(1, keepdim=True)."
        )
    if maps.shape[2] == 0 or maps.shape[3] == 0:
        raise ValueError(
            f"maps must have H, W >= 1, got shape {tuple(maps.shape)}; pass non-empty maps."
        )
    if maps.is_complex() or maps.dtype == torch.bool:
        raise ValueError(
            f"maps must be real numbers, got dtype {maps.dtype}; pass float attribution maps."
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a 1-D integer tensor [N], got {got}; pass one class index per map."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype}; convert with labels.long()."
        )
    if labels.shape[0] != maps.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but maps has {maps.shape[0]} rows; "
            "pass exactly one label per map, in the same order."
        )
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(
            f"class_names must be a non-empty sequence of names, got {class_names!r}; "
            "pass one name per class, e.g. ['cat', 'dog']."
        )
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(class_names):
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} is out of range for {len(class_names)} class_names "
                f"(valid 0..{len(class_names) - 1}); pass the full list of class names "
                "or fix the labels."
            )
    for name, value in (("max_clusters", max_clusters), ("size", size), ("neighbours", neighbours)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}; pass e.g. {name}=4.")
    if maps.numel() and not bool(torch.isfinite(maps).all()):
        raise ValueError(
            "maps contain NaN or infinite values; fix the explainer (or drop those rows) before clustering."
        )


def _features(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Positive part, pooled to ``size x size``, flattened and scaled to unit sum -> ``[N, size*size]``."""
    pooled = F.adaptive_avg_pool2d(maps.detach().cpu().to(torch.float64).clamp_min(0.0), size)
    flat = pooled.flatten(1)
    total = flat.sum(dim=1, keepdim=True)
    uniform = torch.full_like(flat, 1.0 / flat.shape[1])
    return torch.where(total > 0, flat / total.clamp_min(torch.finfo(flat.dtype).tiny), uniform)


def _spectral(
    x: torch.Tensor, max_clusters: int, neighbours: int, seed: int
) -> tuple[torch.Tensor, float]:
    """Spectral clustering of the rows of ``x`` (n >= 2) -> (cluster of each row, eigengap)."""
    n = x.shape[0]
    affinity = _knn_affinity(x, min(neighbours, n - 1))
    degree = affinity.sum(dim=1)  # >= 1: every row has at least one neighbour
    scale = degree.rsqrt()
    laplacian = torch.eye(n, dtype=torch.float64) - scale[:, None] * affinity * scale[None, :]
    laplacian = (laplacian + laplacian.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)

    k_cap = min(max_clusters, n - 1)
    gaps = torch.round(eigenvalues[1 : k_cap + 1] - eigenvalues[:k_cap], decimals=_GAP_DECIMALS)
    k = int(torch.argmax(gaps)) + 1  # first maximum -> the smaller k on ties
    gap = float(gaps[k - 1])
    if k == 1:
        return torch.zeros(n, dtype=torch.int64), gap

    embedding = eigenvectors[:, :k]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    return _kmeans(embedding, k, generator), gap


def _knn_affinity(x: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Symmetric binary kNN affinity: ``A[i, j] = 1`` when j is among i's nearest or i among j's."""
    n = x.shape[0]
    distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    order = torch.sort(distance, dim=1, stable=True).indices[:, :neighbours]
    affinity = torch.zeros(n, n, dtype=torch.float64)
    affinity.scatter_(1, order, 1.0)
    return torch.maximum(affinity, affinity.T)


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means with k-means++ seeding and restarts; returns the cluster of each row."""
    best, best_inertia = None, float("inf")
    for _ in range(_KMEANS_RESTARTS):
        centres = _kmeans_plus_plus(x, k, generator)
        assignment = None
        for _ in range(_KMEANS_MAX_ITER):
            squared = torch.cdist(x, centres).square()
            new = torch.argmin(squared, dim=1)
            if assignment is not None and torch.equal(new, assignment):
                break
            assignment = new
            for c in range(k):
                mask = assignment == c
                if mask.any():  # an empty cluster keeps its centre
                    centres[c] = x[mask].mean(dim=0)
        squared = torch.cdist(x, centres).square()
        assignment = torch.argmin(squared, dim=1)
        inertia = float(squared.gather(1, assignment[:, None]).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = assignment, inertia
    assert best is not None
    return best


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) drawn from ``generator``."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = torch.cdist(x, x[chosen]).square().min(dim=1).values
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0:
            index = int(torch.multinomial(closest / total, 1, generator=generator))
        else:  # every row coincides with a centre: take any row not yet chosen
            index = next((i for i in range(n) if i not in chosen), chosen[0])
        chosen.append(index)
        closest = torch.minimum(closest, torch.cdist(x, x[index : index + 1]).square().flatten())
    return x[chosen].clone()
