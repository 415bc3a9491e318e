"""Ordering: the greedy similarity walk, near-duplicate groups, nearest neighbours."""

import numpy as np
import pytest

from diffmoe.data.knn import nearest_neighbours
from diffmoe.data.order import keep_one_per_group, near_duplicate_groups, similarity_walk


def knn_edges(vectors, k, backend="sklearn"):
    nb = nearest_neighbours(vectors, k, backend)
    a = np.repeat(np.arange(len(vectors)), nb.shape[1])
    b = nb.ravel()
    return a, b, np.einsum("pd,pd->p", vectors[a], vectors[b])


def arc(positions):
    """Unit vectors at the given angles (radians): cosine similarity falls with angular distance."""
    return np.stack([np.cos(positions), np.sin(positions)], axis=1).astype(np.float32)


def test_walk_follows_a_chain_whose_order_is_known():
    # 40 points on an arc with growing gaps, presented in a shuffled order. Each point's nearest
    # neighbour is the previous point, so the graph is the arc itself: the two ends have the minimum
    # degree, and the walk must trace the arc from one end to the other.
    rng = np.random.default_rng(0)
    angles = np.cumsum(np.linspace(0.001, 0.02, 40))
    shuffle = rng.permutation(40)
    vectors = arc(angles[shuffle])
    order = similarity_walk(40, *knn_edges(vectors, k=1))
    along_arc = np.argsort(np.argsort(angles[shuffle]))[order]  # arc position of each visited doc
    assert sorted(order.tolist()) == list(range(40))
    assert along_arc.tolist() in (list(range(40)), list(range(39, -1, -1)))


def test_walk_visits_every_document_once_and_stays_in_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    labels = rng.permutation(np.repeat(np.arange(5), 30))
    vectors = centres[labels] + 0.05 * rng.normal(size=(150, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    order = similarity_walk(150, *knn_edges(vectors, k=5))
    assert np.array_equal(np.sort(order), np.arange(150))
    # Neighbour graphs of well-separated clusters do not connect, so the walk changes cluster only
    # when it is stuck and jumps to a new start: a handful of times, where a random order would
    # change cluster at ~120 of 149 steps.
    assert int((np.diff(labels[order]) != 0).sum()) < 20


def test_walk_prefers_the_most_similar_unvisited_neighbour_and_starts_at_minimum_degree():
    # 0 has degree 1 (start); 1 links to 2 (0.9) and 3 (0.5); 2 to 4; 3 is reached by a jump.
    a = np.array([0, 1, 1, 2])
    b = np.array([1, 2, 3, 4])
    sim = np.array([0.8, 0.9, 0.5, 0.7])
    assert similarity_walk(5, a, b, sim).tolist() == [0, 1, 2, 4, 3]
    # With chains capped at 2 documents the walk restarts at the next minimum-degree document.
    assert similarity_walk(5, a, b, sim, max_chain_docs=2).tolist() == [0, 1, 3, 4, 2]


def test_walk_handles_isolated_documents_and_empty_graphs():
    assert similarity_walk(3, np.array([], int), np.array([], int), np.array([])).tolist() == [0, 1, 2]
    assert similarity_walk(0, np.array([], int), np.array([], int), np.array([])).tolist() == []


def test_near_duplicate_groups_are_connected_components():
    a = np.array([0, 2, 3, 5])
    b = np.array([4, 4, 1, 6])
    sim = np.array([0.95, 0.92, 0.99, 0.5])
    groups = near_duplicate_groups(7, a, b, sim, threshold=0.9)
    assert groups.tolist() == [0, 1, 0, 1, 0, 5, 6]


def test_keep_one_per_group_prefers_marked_documents():
    groups = np.array([0, 1, 0, 1, 0, 5])
    preferred = np.array([False, False, False, False, True, False])
    assert np.flatnonzero(keep_one_per_group(groups, preferred)).tolist() == [1, 4, 5]


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_nearest_neighbours_exclude_self_even_among_duplicates(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors[10:13] = vectors[10]  # three identical rows
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    nb = nearest_neighbours(vectors, 4, backend)
    assert nb.shape == (50, 4)
    assert not (nb == np.arange(50)[:, None]).any()
    assert set(nb[10, :2].tolist()) == {11, 12}
    sims = vectors @ vectors.T
    found = np.take_along_axis(sims, nb, axis=1)
    exact = -np.sort(-(sims - 10 * np.eye(50)), axis=1)[:, :4]  # best 4 similarities, self excluded
    np.testing.assert_allclose(found, exact, atol=1e-5)
    assert nearest_neighbours(vectors[:1], 4, backend).shape == (1, 0)
