"""The class-accuracy probe of the per-class eval: ridge regression against its closed form, the stratified
held-out split, accuracy on separable and on random labels, and the tag and class hit rules."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.errors import EvalError
from ddpm_tf.evaluation.probe import HELD_OUT, Probe, fit_probe, held_out_split, ridge


@pytest.mark.parametrize("n, d", [(40, 6), (8, 30)])  # the primal form (D <= N), then the dual one
def test_ridge_is_the_closed_form_solution(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    expected = np.linalg.solve(x.T @ x + 0.7 * np.eye(d), x.T @ y)  # (X'X + lambda I)^-1 X'y
    np.testing.assert_allclose(ridge(x, y, 0.7), expected, rtol=1e-8, atol=1e-10)


def test_the_held_out_split_is_stratified_and_seeded():
    sizes = [10, 5, 2, 1]
    matrix = np.concatenate([np.tile(np.eye(4, dtype=np.uint8)[k], (m, 1)) for k, m in enumerate(sizes)])
    mask = held_out_split(matrix, "class", seed=3)
    per_class = [int(mask[matrix[:, k] == 1].sum()) for k in range(4)]
    assert per_class == [round(HELD_OUT * 10), 1, 1, 0]  # 20 %, at least one, never a class's only image
    assert np.array_equal(mask, held_out_split(matrix, "class", seed=3))
    assert not np.array_equal(mask, held_out_split(matrix, "class", seed=4))
    assert held_out_split(np.ones((50, 3)), "tags").sum() == 10  # tags: 20 % of every image


def clusters(rng, k=3, per=20, d=16, spread=0.3):
    centres = rng.normal(0, 3, (k, d))
    labels = np.repeat(np.arange(k), per)
    return centres[labels] + rng.normal(0, spread, (k * per, d)), np.eye(k, dtype=np.uint8)[labels], centres


def test_separable_classes_are_found_on_images_the_probe_never_saw():
    rng = np.random.default_rng(1)
    features, matrix, centres = clusters(rng)
    probe = fit_probe(features, matrix, "class")
    assert probe.held_out_accuracy == 1.0 and probe.n_fit == 60
    fresh = centres[[0, 1, 2, 2]] + rng.normal(0, 0.3, (4, 16))
    assert probe.accuracy(fresh, np.eye(3)[[0, 1, 2, 2]]) == 1.0
    assert probe.accuracy(fresh, np.eye(3)[[1, 2, 0, 1]]) == 0.0  # asked for another class: a miss each


def test_random_labels_give_chance_accuracy_on_held_out_images():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 8))
    matrix = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 400)]
    assert fit_probe(features, matrix, "class").held_out_accuracy < 0.4  # chance is 0.25


def test_unlabelled_rows_are_left_out_and_too_few_images_refused():
    rng = np.random.default_rng(3)
    features, matrix, _ = clusters(rng, per=5)
    with_unlabelled = np.concatenate([matrix, np.zeros((7, 3), np.uint8)])
    probe = fit_probe(np.concatenate([features, rng.normal(size=(7, 16))]), with_unlabelled, "class")
    assert probe.n_fit == 15
    with pytest.raises(EvalError, match="at least 2 labelled training images, found 1"):
        fit_probe(features[:2], np.array([[1, 0, 0], [0, 0, 0]]), "class")


def test_hits_count_the_top_class_or_the_share_of_tags_found():
    # An identity probe: the scores are the features themselves.
    probe = Probe("tags", np.zeros(3), np.ones(3), np.vstack([np.eye(3), np.zeros((1, 3))]), 1.0, 10)
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.1], [0.2, 0.2, 0.2]])
    asked = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(probe.hits(scores, asked), [1.0, 0.5, 0.0])  # 2 of 2, 1 of 2, 0 of 1
    as_classes = Probe("class", *(getattr(probe, f) for f in ("mean", "scale", "weights")), 1.0, 10)
    np.testing.assert_allclose(as_classes.hits(scores, np.eye(3)[[0, 1, 2]]), [1.0, 0.0, 0.0])  # the argmax (a tie: the first)
