"""SpRAy-style clustering of attribution maps (audit.evidence.clusters)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from audit.evidence.clusters import Cluster, cluster_maps


def _blobs(
    row: int, col: int, n: int, *, seed: int, side: int = 32, noise: float = 0.05
) -> torch.Tensor:
    """``n`` maps [n,1,side,side]: an 8x8 blob at (row, col) on small uniform noise."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, 1, side, side, generator=g) * noise
    maps[:, :, row : row + 8, col : col + 8] += 1.0
    return maps


def _two_patterns(n_each: int = 20, *, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """Top-left and bottom-right blobs, shuffled; returns maps and the two true member lists."""
    maps = torch.cat([_blobs(2, 2, n_each, seed=seed), _blobs(22, 22, n_each, seed=seed + 1)])
    perm = torch.randperm(2 * n_each, generator=torch.Generator().manual_seed(seed + 2))
    maps = maps[perm]
    top_left = sorted(torch.nonzero(perm < n_each).flatten().tolist())
    bottom_right = sorted(torch.nonzero(perm >= n_each).flatten().tolist())
    return maps, top_left, bottom_right


def _key(clusters: list[Cluster]) -> list[tuple]:
    return [(c.class_index, c.cluster, c.size, tuple(c.members), c.eigengap) for c in clusters]


def test_two_patterns_recover_the_partition():
    maps, top_left, bottom_right = _two_patterns()
    clusters = cluster_maps(maps, torch.zeros(40, dtype=torch.long), ["wolf"])
    assert len(clusters) == 2
    assert {tuple(c.members) for c in clusters} == {tuple(top_left), tuple(bottom_right)}
    assert [c.cluster for c in clusters] == [0, 1]
    assert all(c.size == 20 and c.class_name == "wolf" and c.class_index == 0 for c in clusters)
    # two components of the kNN graph: a clear gap, shared by both clusters of the class
    assert clusters[0].eigengap == clusters[1].eigengap > 0.3


def test_clusters_are_ordered_by_size_descending():
    maps = torch.cat([_blobs(22, 22, 12, seed=3), _blobs(2, 2, 25, seed=4)])
    clusters = cluster_maps(maps, torch.zeros(37, dtype=torch.long), ["x"])
    assert [c.size for c in clusters] == [25, 12]
    assert clusters[0].members == list(range(12, 37))
    assert clusters[1].members == list(range(12))


def test_three_patterns_give_three_clusters():
    maps = torch.cat(
        [_blobs(2, 2, 15, seed=5), _blobs(22, 22, 15, seed=6), _blobs(2, 22, 15, seed=7)]
    )
    clusters = cluster_maps(maps, torch.zeros(45, dtype=torch.long), ["x"])
    assert sorted(tuple(c.members) for c in clusters) == [
        tuple(range(0, 15)),
        tuple(range(15, 30)),
        tuple(range(30, 45)),
    ]


def test_max_clusters_caps_k():
    maps, _, _ = _two_patterns()
    clusters = cluster_maps(maps, torch.zeros(40, dtype=torch.long), ["x"], max_clusters=1)
    assert len(clusters) == 1 and clusters[0].members == list(range(40))


@pytest.mark.parametrize("n", [2, 3, 12, 40])
def test_single_pattern_is_one_cluster(n):
    maps = _blobs(10, 10, n, seed=n, noise=0.3)
    clusters = cluster_maps(maps, torch.zeros(n, dtype=torch.long), ["x"])
    assert len(clusters) == 1
    assert clusters[0].size == n and clusters[0].members == list(range(n))
    assert clusters[0].eigengap > 0


def test_classes_never_mix_and_sizes_add_up():
    maps_a, _, _ = _two_patterns(seed=10)  # class 0: two strategies
    maps_b = _blobs(10, 10, 15, seed=11)  # class 2: one strategy
    maps_c = _blobs(2, 2, 1, seed=12)  # class 3: a single map
    maps = torch.cat([maps_a, maps_b, maps_c])
    labels = torch.tensor([0] * 40 + [2] * 15 + [3])
    # interleave the classes so that row order does not follow the labels
    perm = torch.randperm(56, generator=torch.Generator().manual_seed(13))
    maps, labels = maps[perm], labels[perm]
    names = ["a", "b", "c", "d"]

    clusters = cluster_maps(maps, labels, names)

    assert [(c.class_index, c.cluster) for c in clusters] == sorted(
        (c.class_index, c.cluster) for c in clusters
    )
    assert {c.class_index for c in clusters} == {0, 2, 3}  # class 1 has no maps -> no clusters
    for c in clusters:
        assert c.class_name == names[c.class_index]
        assert all(int(labels[m]) == c.class_index for m in c.members)
        assert c.members == sorted(c.members) and c.size == len(c.members)
    for index in (0, 2, 3):
        mine = [m for c in clusters if c.class_index == index for m in c.members]
        assert sorted(mine) == torch.nonzero(labels == index).flatten().tolist()
    assert [c.size for c in clusters if c.class_index == 0] == [20, 20]
    assert [c.size for c in clusters if c.class_index == 2] == [15]
    single = [c for c in clusters if c.class_index == 3]
    assert len(single) == 1 and single[0].size == 1 and single[0].eigengap == 0.0


def test_deterministic_and_global_rng_untouched():
    maps = torch.cat(
        [_blobs(2, 2, 15, seed=20), _blobs(22, 22, 15, seed=21), _blobs(2, 22, 15, seed=22)]
    )
    labels = torch.tensor([0] * 20 + [1] * 25)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = cluster_maps(maps, labels, ["a", "b"], seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state must not change the result
    second = cluster_maps(maps, labels, ["a", "b"], seed=7)
    assert _key(first) == _key(second)
    # the clustering of a class does not depend on the other classes present
    alone = cluster_maps(maps[20:], labels[20:] - 1, ["b"], seed=7)
    assert [tuple(m + 20 for m in c.members) for c in alone] == [
        tuple(c.members) for c in first if c.class_index == 1
    ]


def test_zero_and_constant_maps_give_no_nan():
    maps = torch.cat(
        [torch.zeros(10, 1, 8, 8), torch.full((10, 1, 8, 8), 3.0), -torch.ones(5, 1, 8, 8)]
    )
    clusters = cluster_maps(maps, torch.zeros(25, dtype=torch.long), ["x"])
    # zero, constant and all-negative maps all become the uniform map: one strategy
    assert len(clusters) == 1 and clusters[0].members == list(range(25))
    assert math.isfinite(clusters[0].eigengap)


def test_sign_uses_the_positive_part():
    maps, top_left, bottom_right = _two_patterns()
    # negative relevance elsewhere must not change the clustering
    noisy = maps.clone()
    noisy[:, :, 10:20, 10:20] = -5.0
    base = cluster_maps(maps, torch.zeros(40, dtype=torch.long), ["x"])
    signed = cluster_maps(noisy, torch.zeros(40, dtype=torch.long), ["x"])
    assert {tuple(c.members) for c in signed} == {tuple(top_left), tuple(bottom_right)}
    assert [c.members for c in signed] == [c.members for c in base]


def test_to_dict_is_json_ready():
    maps, _, _ = _two_patterns()
    clusters = cluster_maps(maps, torch.zeros(40, dtype=torch.int32), ["wolf"])
    d = clusters[0].to_dict()
    assert set(d) == {"class_index", "class_name", "cluster", "size", "members", "eigengap"}
    assert json.loads(json.dumps(d)) == d
    assert type(d["eigengap"]) is float and all(type(m) is int for m in d["members"])


def test_empty_input_gives_no_clusters():
    assert cluster_maps(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), ["x"]) == []


@pytest.mark.parametrize(
    "maps, labels, names, kwargs, match",
    [
        (torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), ["x"], {}, r"\[N, 1, H, W\].*sum"),
        (
            torch.zeros(4, 3, 8, 8),
            torch.zeros(4, dtype=torch.long),
            ["x"],
            {},
            r"one channel.*keepdim",
        ),
        (
            torch.zeros(4, 1, 8, 8),
            torch.zeros(3, dtype=torch.long),
            ["x"],
            {},
            r"3 entries.*4 rows.*one label",
        ),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, dtype=torch.long), ["x"], {}, r"1-D"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4), ["x"], {}, r"integer.*long\(\)"),
        (
            torch.zeros(4, 1, 8, 8),
            torch.tensor([0, 1, 2, 0]),
            ["x", "y"],
            {},
            r"label 2 .*range.*2 class_names",
        ),
        (torch.zeros(4, 1, 8, 8), torch.tensor([0, -1, 0, 0]), ["x"], {}, r"label -1 .*range"),
        (
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            [],
            {},
            r"class_names.*non-empty",
        ),
        (
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            ["x"],
            {"max_clusters": 0},
            r"max_clusters.*>= 1",
        ),
        (
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            ["x"],
            {"neighbours": 0},
            r"neighbours.*>= 1",
        ),
        (
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            ["x"],
            {"size": 0},
            r"size.*>= 1",
        ),
        (
            torch.full((4, 1, 8, 8), float("nan")),
            torch.zeros(4, dtype=torch.long),
            ["x"],
            {},
            r"NaN",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(maps, labels, names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_maps(maps, labels, names, **kwargs)
