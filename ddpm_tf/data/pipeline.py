"""The training input: prepared uint8 images -> an infinite tf.data pipeline whose order, flips and augmentation
are a pure function of (seed, epoch), so a resumed run continues it exactly. With augment.py, the only part of
`ddpm_tf.data` that uses TensorFlow."""

from __future__ import annotations

import numpy as np


def make_dataset(images, batch_size: int, seed: int, start_epoch: int = 0, flip: bool = True, skip_images: int = 0,
                 labels=None, augment_p: float = 0.0):
    """Infinite tf.data pipeline of float32 batches in [-1, 1], one epoch after another.

    `images` is an (N, S, S, C) uint8 array (held in the graph) or a cache.ShardedImages (memory-mapped
    shards, read a batch at a time): the batches are identical either way. Each epoch is a fresh
    permutation of all images drawn from the stateless seed (seed, epoch), so every image is seen once
    per epoch, and each image's flip is drawn from (seed + 1, epoch) at its index: the data order is a
    pure function of (seed, epoch), and a resumed run continues it exactly. `skip_images` drops the first
    images of `start_epoch`'s order (a resume mid-epoch, also with another batch size: under tf.distribute the
    global batch depends on the number of replicas).

    With `labels`, an (N, K) uint8 multi-hot matrix (labels.Labels.matrix, rows as the images'), each batch is
    (x, y) with y (B, K) float32, gathered with the same index (a flip does not change a label); without, the
    batches are x alone, exactly as before labels existed.

    With `augment_p` > 0 (augment.py), each batch is (x, y, a): x augmented after the flip, y the labels as above
    or (B, 0) without, a (B, augment.DIM) the conditioning vectors, drawn from (seed + 2, epoch) and
    (seed + 3, epoch) at each image's index.
    """
    from ..compat import tf
    from . import augment

    n = len(images)
    if labels is not None:
        labels = np.asarray(getattr(labels, "matrix", labels), np.uint8)  # a labels.Labels or its matrix
        assert labels.ndim == 2 and len(labels) == n, f"labels {labels.shape} for {n} images"
        label_table = tf.constant(labels)  # (N, K) uint8: small beside the images
    shape = tuple(int(d) for d in images.shape[1:])
    if isinstance(images, np.ndarray):
        table = tf.constant(images)  # (N, S, S, C) uint8

        def gather(index):
            return tf.gather(table, index)
    else:
        def gather(index):
            x = tf.numpy_function(images.take, [index], tf.uint8, stateful=False)
            return tf.ensure_shape(x, (None,) + shape)

    def epoch_batches(epoch):
        epoch_seed = tf.cast(epoch, tf.int32)
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch_seed])))
        order = order[tf.where(epoch == start_epoch, skip_images, 0):]
        flips = tf.random.stateless_uniform([n], seed=tf.stack([seed + 1, epoch_seed])) < 0.5
        params = augment.draw(n, augment_p, shape[0], seed, epoch_seed) if augment_p > 0 else None

        def load(index):  # (B,) int32 -> (B, S, S, C) float32 [, (B, K) float32]
            x = gather(index)
            if flip:
                x = tf.where(tf.gather(flips, index)[:, None, None, None], tf.reverse(x, axis=[2]), x)
            x = tf.cast(x, tf.float32) / 127.5 - 1.0
            y = None if labels is None else tf.cast(tf.gather(label_table, index), tf.float32)
            if params is None:
                return x if y is None else (x, y)
            p = tf.gather(params, index)
            y = tf.zeros([tf.shape(x)[0], 0]) if y is None else y
            return augment.apply(x, p), y, augment.conditioning(p, shape[0])

        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(load)

    ds = tf.data.Dataset.range(start_epoch, 2**31 - 1).flat_map(epoch_batches)
    return ds.prefetch(tf.data.AUTOTUNE)
