"""Train a small face-identity network on the ORL faces and save it as a feature extractor for `ddpm eval`.

FID and KID are usually computed in the feature space of ImageNet's Inception-V3. Where Keras cannot
download those weights (an offline machine, like the one docs/evaluation.md's figures come from), a
domain-specific network is the usual substitute: FID on MNIST is customarily computed with a small
MNIST classifier. This script trains a CNN to tell the 40 ORL people apart (8 photos each for
training, 2 held out to report accuracy), then saves the network up to its 128-d penultimate layer as
a whole Keras model (`.h5`, readable by both Keras lines) that `ddpm eval --features FILE` loads.
Its figures are only comparable with figures from the same file, never with Inception FIDs.

    python scripts/train_feature_net.py --data data/orl --out runs/orl-features.h5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_people(root: Path, size: int):
    """(images uint8 (N, S, S, 1), person labels) of the ORL layout root/sK/*.pgm."""
    from ddpm_tf.data.decode import load_image

    images, labels = [], []
    folders = sorted((p for p in root.glob("s*") if p.is_dir()), key=lambda p: int(p.name[1:]))
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.pgm")):
            images.append(load_image(path, size, 1))
            labels.append(label)
    if not images:
        raise SystemExit(f"train_feature_net: no ORL faces under {root} (expected {root}/s1/1.pgm ...); "
                         f"run `python scripts/fetch_orl.py {root}`")
    return np.stack(images), np.array(labels)


def build(size: int, classes: int, width: int = 32, features: int = 128):
    """A plain CNN on pixels in [-1, 1] (the convention `ddpm eval` feeds a whole model): (features, logits)."""
    from ddpm_tf.compat import keras

    layers = keras.layers
    inputs = keras.Input((size, size, 1))
    x = inputs
    for i, mult in enumerate((1, 2, 4)):
        x = layers.Conv2D(width * mult, 3, padding="same", activation="relu", name=f"conv{i}a")(x)
        x = layers.Conv2D(width * mult, 3, padding="same", activation="relu", name=f"conv{i}b")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    feats = layers.Dense(features, activation="relu", name="features")(x)
    logits = layers.Dense(classes, name="logits")(layers.Dropout(0.3)(feats))
    return keras.Model(inputs, feats, name="orl_features"), keras.Model(inputs, logits, name="orl_classifier")


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and shifts of up to 2 pixels (edge padding)."""
    out = np.where(rng.random(len(images))[:, None, None, None] < 0.5, images[:, :, ::-1], images)
    padded = np.pad(out, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 5, size=(2, len(images)))
    size = images.shape[1]
    return np.stack([p[y:y + size, x:x + size] for p, y, x in zip(padded, dy, dx)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/orl"))
    parser.add_argument("--out", type=Path, default=Path("runs/orl-features.h5"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ddpm_tf.compat import keras

    images, labels = load_people(args.data, args.size)
    held_out = np.arange(len(images)) % 10 >= 8  # photos 9 and 10 of each person
    keras.utils.set_random_seed(args.seed)
    feature_net, classifier = build(args.size, int(labels.max()) + 1)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rng = np.random.default_rng(args.seed)
    scaled = images.astype(np.float32) / 127.5 - 1.0
    train_x, train_y = scaled[~held_out], labels[~held_out]
    for _ in range(args.epochs):
        classifier.fit(augment(train_x, rng), train_y, batch_size=32, epochs=1, verbose=0, shuffle=True)
    _, accuracy = classifier.evaluate(scaled[held_out], labels[held_out], verbose=0)
    print(f"held-out identification accuracy: {accuracy:.3f} ({held_out.sum()} photos, 40 people, "
          f"chance 0.025)")
    # Unit RMS on the training set: KID's kernel (x.y/d + 1)^3 then sees features of order 1, as it does
    # Inception's pool features, and the figures stay readable.
    rms = float(np.sqrt(np.mean(np.square(feature_net.predict(scaled, verbose=0)))))
    feature_net = keras.Sequential([feature_net, keras.layers.Rescaling(1.0 / rms)], name="orl_features")
    feature_net.build((None, args.size, args.size, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.h5")
    feature_net.save(tmp)
    os.replace(tmp, args.out)
    print(f"feature network ({feature_net.output_shape[-1]}-d) saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
