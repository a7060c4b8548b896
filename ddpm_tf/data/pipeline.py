"""The training input: prepared uint8 images -> an infinite tf.data pipeline whose order is a pure function of
(seed, epoch), so a resumed run continues it exactly. The only part of `ddpm_tf.data` that uses TensorFlow."""

from __future__ import annotations

import numpy as np


def make_dataset(images, batch_size: int, seed: int, start_epoch: int = 0, flip: bool = True, skip: int = 0):
    """Infinite tf.data pipeline of float32 batches in [-1, 1], one epoch after another.

    `images` is an (N, S, S, C) uint8 array (held in the graph) or a cache.ShardedImages (memory-mapped
    shards, read a batch at a time): the batches are identical either way. Each epoch is a fresh
    permutation of all images drawn from the stateless seed (seed, epoch), so every image is seen once
    per epoch, and each image's flip is drawn from (seed + 1, epoch) at its index: the data order is a
    pure function of (seed, epoch), and a resumed run continues it exactly. `skip` drops the first
    batches of `start_epoch` (a resume mid-epoch).
    """
    from ..compat import tf

    n = len(images)
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
        flips = tf.random.stateless_uniform([n], seed=tf.stack([seed + 1, epoch_seed])) < 0.5

        def load(index):  # (B,) int32 -> (B, S, S, C) float32
            x = gather(index)
            if flip:
                x = tf.where(tf.gather(flips, index)[:, None, None, None], tf.reverse(x, axis=[2]), x)
            return tf.cast(x, tf.float32) / 127.5 - 1.0

        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(load)

    ds = tf.data.Dataset.range(start_epoch, 2**31 - 1).flat_map(epoch_batches).skip(skip)
    return ds.prefetch(tf.data.AUTOTUNE)
