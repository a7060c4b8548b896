"""Evaluation: FID and KID against closed forms, memorisation flags, reports, feature networks (offline)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from ddpm_tf.compat import KERAS3, keras, tf
from ddpm_tf.errors import MetricError
from ddpm_tf.evaluation import metrics
from ddpm_tf.evaluation import report as evaluate
from ddpm_tf.evaluation.memorization import flip_images, memorization_report, save_pairs_png
from ddpm_tf.evaluation.metrics import fid, frechet_distance, kid, mmd2_unbiased, polynomial_kernel
from ddpm_tf.evaluation.report import (
    INCEPTION_NOTOP_FILE,
    EvalError,
    KerasFeatures,
    evaluate_images,
    load_features,
    load_image_folder,
    prepare_reference,
    save_memorization_csv,
    write_tensorboard,
)
from ddpm_tf.images import save_png
from ddpm_tf.runs import append_csv_row


def rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def smooth_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Random low-frequency colour images (4x4 noise upsampled): a stand-in for a training set."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse])


def noise_images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def tiny_net(input_shape=(None, None, 3), seed: int = 0):
    """A few seeded random conv layers and a global pool: a stand-in feature network, no download."""
    init = [keras.initializers.GlorotUniform(seed=seed + i) for i in range(2)]
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init[0])(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu", kernel_initializer=init[1])(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.fixture(scope="module")
def extractor():
    return KerasFeatures(tiny_net(), "tiny", batch_size=16)


# --- FID ---------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # Commuting covariances (one shared eigenbasis Q): tr (S1 S2)^½ = sum sqrt(d1 d2).
    d = 6
    q = rotation(d, rng)
    d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T) == pytest.approx(expected, rel=1e-9)
    # Non-commuting 2x2: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for A = S1 S2 (eigenvalues >= 0).
    a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-9)
    # A singular covariance (fewer samples than dimensions, as FID at small N) is fine: rank-1 vs itself.
    v = rng.normal(size=(5, 1))
    assert frechet_distance(np.zeros(5), v @ v.T, np.zeros(5), v @ v.T) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    n = 20000
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.0])
    a = mu1 + rng.normal(size=(n, 3)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(n, 3)) * np.sqrt(s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    # Sampling error: the mean term's std is 2 sqrt(sum dmu² (s1 + s2) / n); the covariance terms'
    # relative error is about sqrt(2 / n) per variance. Six of each.
    tol = 6 * (2 * np.sqrt(np.sum((mu1 - mu2) ** 2 * (s1 + s2)) / n) + s1.max() * np.sqrt(2 * 3 / n))
    assert fid(a, b) == pytest.approx(expected, abs=tol)
    assert abs(fid(a, b) - expected) < 0.1 * expected  # the tolerance is tight enough to mean something
    with pytest.raises(MetricError, match="at least 2"):
        fid(a[:1], b)


# --- KID ---------------------------------------------------------------------------------------------

def test_kid_is_unbiased():
    """Mean of KID between independent samples of one distribution is ~0; the V-statistic is not."""
    rng = np.random.default_rng(2)
    m, d, repeats = 50, 8, 20
    unbiased, biased = [], []
    for _ in range(repeats):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        unbiased.append(kid(x, y, subsets=1, subset_size=m)[0])
        assert unbiased[-1] == pytest.approx(mmd2_unbiased(x, y))
        biased.append(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                      - 2 * polynomial_kernel(x, y).mean())
    stderr = np.std(unbiased, ddof=1) / np.sqrt(repeats)
    assert abs(np.mean(unbiased)) < 4 * stderr
    assert np.mean(biased) > 10 * stderr  # the test could tell the two estimators apart


def test_kid_kernel_shortcut_gives_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(14)
    a, b = rng.normal(size=(60, 5)), rng.normal(0.3, 1.0, size=(40, 5))
    shortcut = kid(a, b, subsets=7, subset_size=30, seed=1)
    monkeypatch.setattr(metrics, "GRAM_LIMIT", 0)  # per-subset kernels, as for large sets
    assert kid(a, b, subsets=7, subset_size=30, seed=1) == pytest.approx(shortcut, rel=1e-12)


def test_kid_self_near_zero_and_noise_large(extractor):
    images = smooth_images(300, seed=3)
    feats = extractor(images)
    self_mean, self_std = kid(feats, feats, subsets=50, subset_size=100, seed=0)
    noise_mean, noise_std = kid(feats, extractor(noise_images(300, seed=4)), subsets=50, subset_size=100, seed=0)
    assert abs(self_mean) < 3 * self_std
    assert noise_mean > 10 * noise_std and noise_mean > 100 * abs(self_mean)
    assert kid(feats, feats, subsets=5, subset_size=100, seed=7) == kid(feats, feats, subsets=5, subset_size=100,
                                                                          seed=7)


# --- memorisation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(extractor):
    """Training images, and samples: 4 planted copies, 4 mirrored copies, 8 noise, 8 fresh images."""
    train = smooth_images(40, seed=5)
    samples = np.concatenate([train[[3, 10, 20, 33]], flip_images(train[[1, 7, 15, 39]]),
                              noise_images(8, seed=6), smooth_images(8, seed=7)])
    reference = prepare_reference(train, extractor)
    return train, samples, reference


def test_memorization_flags_copies_and_mirrors_only(planted, extractor):
    train, samples, reference = planted
    report = memorization_report(samples, train, extractor(samples), reference.features,
                                 reference.features_flipped)
    expected = np.array([True] * 8 + [False] * 16)
    for space in ("pixel", "feature"):
        match = report.spaces[space]
        np.testing.assert_array_equal(match.near_copy, expected, err_msg=space)
        np.testing.assert_array_equal(match.neighbours.index[:8], [3, 10, 20, 33, 1, 7, 15, 39])
        np.testing.assert_array_equal(match.neighbours.flipped[:8], [False] * 4 + [True] * 4)
        assert np.all(match.neighbours.distance[:8] < 1e-6)
        assert match.threshold > 0
    np.testing.assert_array_equal(report.near_copy, expected)
    assert report.share == pytest.approx(8 / 24)
    summary = report.summary()
    assert summary["near_copy_share"] == pytest.approx(8 / 24)
    assert summary["pixel_train_to_train_p5"] <= summary["pixel_train_to_train_p50"]
    rows = report.rows()
    assert rows[4]["pixel_flipped"] and rows[4]["pixel_train_index"] == 1 and not rows[20]["near_copy"]


def test_memorization_train_to_train_excludes_self_and_mirror():
    # Every training image symmetric: leave-one-out must still skip its own mirror (distance 0).
    train = smooth_images(10, seed=8)
    train = np.concatenate([train[:, :, :8], train[:, :, :8][:, :, ::-1]], axis=2)
    report = memorization_report(noise_images(3, seed=9), train)
    assert np.all(report.spaces["pixel"].train_nn > 0.01)
    assert not report.near_copy.any()


def test_pairs_png(planted, tmp_path):
    train, samples, _ = planted
    report = memorization_report(samples, train)
    path = save_pairs_png(tmp_path / "pairs.png", samples, train, report, k=6, pairs_per_row=4)
    with Image.open(path) as im:
        im.load()
        # Each pair: 2 images of 16 with 1 px padding -> 18 x 35; 2 rows x 4 pairs with 4 px gaps.
        assert im.size == (4 * (35 + 4) + 4, 2 * (18 + 4) + 4)
        assert im.mode == "RGB"
        pairs = im.text["ddpm_tf:pairs"].split()
    assert len(pairs) == 6 and all(int(p.split(":")[0]) < 8 for p in pairs)  # the copies come first
    assert not list(tmp_path.glob(".*tmp*"))


# --- reports -----------------------------------------------------------------------------------------

def test_eval_csv_round_trip(tmp_path):
    path = tmp_path / "eval.csv"
    append_csv_row(path, {"step": 100, "kid_mean": 0.0123456789, "fid": 12.5})
    append_csv_row(path, {"step": 200, "kid_mean": -1e-4, "fid": 10.0, "near_copy_share": 0.25})
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["step", "kid_mean", "fid", "near_copy_share"]
    assert [r["step"] for r in rows] == ["100", "200"]
    assert float(rows[0]["kid_mean"]) == pytest.approx(0.0123457) and rows[0]["near_copy_share"] == ""
    assert float(rows[1]["near_copy_share"]) == 0.25
    assert path.read_text(encoding="utf-8").count("step") == 1


def test_evaluate_images_end_to_end(planted, extractor, tmp_path):
    train, samples, reference = planted
    result = evaluate_images(samples, reference, extractor, kid_subsets=10, kid_subset_size=100, seed=0,
                             memorization=True)
    assert (result.n, result.n_train, result.kid_subset_size, result.features) == (24, 40, 24, "tiny")
    assert result.memorization.share == pytest.approx(8 / 24)
    assert np.isfinite(result.fid) and result.fid >= 0
    row = result.row()
    assert row["kid_mean"] == result.kid_mean and "pixel_sample_to_train_p50" in row
    append_csv_row(tmp_path / "eval.csv", {"step": 7, **row})
    save_memorization_csv(tmp_path / "memorization.csv", result.memorization)
    with open(tmp_path / "memorization.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 24
    pairs = save_pairs_png(tmp_path / "pairs.png", samples, train, result.memorization, k=4)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    write_tensorboard(writer, result, step=7, pairs_png=pairs)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert {"eval/kid_mean", "eval/kid_std", "eval/fid", "eval/near_copy_share", "eval/closest_pairs"} <= tags


def test_load_image_folder(tmp_path):
    images = smooth_images(3, seed=10)
    for i, img in enumerate(images):
        save_png(tmp_path / "samples" / f"{i:04d}.png", img)
    (tmp_path / "samples" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="broken.png"):
        loaded = load_image_folder(tmp_path / "samples", 16, 3)
    np.testing.assert_array_equal(loaded, images)
    assert load_image_folder(tmp_path / "samples", 8, 1, warn=lambda m: None).shape == (3, 8, 8, 1)
    with pytest.raises(EvalError, match="not a folder"):
        load_image_folder(tmp_path / "missing", 16, 3)


# --- feature networks --------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_features_from_saved_model(tmp_path, suffix):
    if suffix == ".keras" and not KERAS3:
        pytest.skip("TF 2.10's Keras has no .keras format")
    model = tiny_net(input_shape=(32, 32, 3), seed=11)  # fixed size: 16x16 images get resized
    path = tmp_path / f"features{suffix}"
    model.save(str(path))
    loaded = load_features(path)
    assert loaded.name == f"model:features{suffix}" and loaded.size == (32, 32)
    images = smooth_images(5, seed=12)
    feats = loaded(images)
    assert feats.shape == (5, 32) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, KerasFeatures(model, "same")(images), rtol=1e-5, atol=1e-6)
    gray = images[..., :1]
    np.testing.assert_allclose(loaded(gray), loaded(np.repeat(gray, 3, axis=-1)), rtol=1e-5, atol=1e-6)


def test_features_file_errors(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=f"missing.h5: no such file.*{INCEPTION_NOTOP_FILE}"):
        load_features(tmp_path / "missing.h5")
    with pytest.raises(EvalError, match="a folder, not a file"):
        load_features(tmp_path)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00 definitely not HDF5" * 10)
    with pytest.raises(EvalError, match="garbage.h5: neither an HDF5"):
        load_features(garbage)
    broken_zip = tmp_path / "broken.keras"
    import zipfile

    with zipfile.ZipFile(broken_zip, "w") as z:
        z.writestr("config.json", "{not json")
    with pytest.raises(EvalError, match="broken.keras: cannot load this Keras model"):
        load_features(broken_zip)

    def offline(weights):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(evaluate, "_inception", offline)
    with pytest.raises(EvalError, match=f"--features PATH.*{INCEPTION_NOTOP_FILE}"):
        load_features(None)
    weights_only = tmp_path / "other.weights.h5"
    tiny_net((16, 16, 3)).save_weights(str(weights_only))
    with pytest.raises(EvalError, match=f"other.weights.h5: not Inception-V3 no-top weights.*{INCEPTION_NOTOP_FILE}"):
        load_features(weights_only)


def test_inception_path_shape():
    """Inception-V3 with random weights (no download): gray 16x16 in, resized to 299, 2048 features out,
    built in float32 even under a run's mixed precision policy."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        features = evaluate.inception_features(None, batch_size=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert {layer.compute_dtype for layer in features.model.layers} == {"float32"}
    out = features(smooth_images(2, seed=13)[..., :1])
    assert out.shape == (2, 2048) and np.all(np.isfinite(out))
