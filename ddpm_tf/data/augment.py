"""Non-leaky augmentation (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
models", Appendix F.2; NVlabs/edm training/augment.py): with probability `train.augment_p` each transform is
applied to a training image, and its parameters are given to the network as a conditioning vector. Sampling
passes zeros, the vector of "not transformed", so the model learns the transforms without generating them.

Implemented, in EDM's order and with EDM's parameter distributions:
  - x-flip: flipped with probability 1/2 once selected (on top of `data.flip`'s plain flips, which the
    network is not told about: a mirrored face is still a face);
  - integer translation: up to 1/8 of the side each way, uniform, edges mirrored;
  - isotropic scaling: 2**(0.2 w), w ~ N(0, 1);
  - rotation: theta ~ U(-pi, pi);
  - anisotropic scaling: 2**(0.2 w) along an axis at angle r and its inverse across it, w ~ N(0, 1), r ~
    U(-pi, pi) for half of the selected images and 0 for the others.
Each is selected independently with probability p. Not implemented: EDM's y-flip, 90-degree rotations,
fractional translation and colour transforms. The geometric transforms are one bilinear resampling with
mirrored edges (TensorFlow's ImageProjectiveTransformV3); EDM resamples at 2x through a wavelet filter to
reduce aliasing.

The parameters of image i in epoch e are drawn from the stateless seeds (seed + 2, e) and (seed + 3, e) at
row i, like its flip, so the augmentation is a pure function of (seed, epoch, index) and a resume continues it
exactly. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import math

# The conditioning vector, in this order; all zero is the identity. Translations are in units of the largest
# shift (1/8 of the side); scale and aniso carry w of 2**(0.2 w); the rotation is (cos theta - 1, sin theta).
LAYOUT = ("xflip", "translate_x", "translate_y", "scale", "rotate_cos", "rotate_sin", "aniso_cos", "aniso_sin")
DIM = len(LAYOUT)
TRANSLATE_MAX = 0.125  # EDM's translate_int_max: a fraction of the side
SCALE_STD = 0.2  # EDM's scale_std and aniso_std, in log2 units
ANISO_STD = 0.2
ANISO_ROTATE_PROB = 0.5  # EDM's aniso_rotate_prob
# The parameters a pipeline draws per image (rows of `draw`), from which the image and its vector follow.
PARAMETERS = ("flip", "tx", "ty", "scale_w", "theta", "aniso_w", "aniso_r")


def network_dim(augment_p: float) -> int:
    """Width of the network's augmentation input for `train.augment_p`: DIM when on, 0 (no input) when off."""
    return DIM if augment_p > 0 else 0


def draw(n: int, p: float, size: int, seed: int, epoch):
    """(n, 7) float32 parameters (PARAMETERS) of images 0..n-1 in `epoch`, each transform selected with
    probability p; a pure function of (seed, epoch)."""
    from ..compat import tf

    epoch = tf.cast(epoch, tf.int32)
    u = tf.random.stateless_uniform([n, 11], seed=tf.stack([seed + 2, epoch]))
    g = tf.random.stateless_normal([n, 2], seed=tf.stack([seed + 3, epoch]))
    on = [tf.cast(u[:, k] < p, tf.float32) for k in range(5)]  # flip, translate, scale, rotate, aniso
    shift = round(size * TRANSLATE_MAX)
    flip = on[0] * tf.cast(u[:, 5] < 0.5, tf.float32)
    tx = on[1] * tf.round((u[:, 6] * 2 - 1) * shift)
    ty = on[1] * tf.round((u[:, 7] * 2 - 1) * shift)
    theta = on[3] * (u[:, 8] * 2 - 1) * math.pi
    aniso_r = on[4] * tf.cast(u[:, 10] < ANISO_ROTATE_PROB, tf.float32) * (u[:, 9] * 2 - 1) * math.pi
    return tf.stack([flip, tx, ty, on[2] * g[:, 0], theta, on[4] * g[:, 1], aniso_r], axis=1)


def conditioning(params, size: int):
    """(B, 7) parameters -> (B, DIM) float32 conditioning vectors in LAYOUT's order (zero: not transformed)."""
    from ..compat import tf

    flip, tx, ty, scale_w, theta, aniso_w, aniso_r = tf.unstack(params, axis=1)
    shift = float(max(round(size * TRANSLATE_MAX), 1))
    return tf.stack([flip, tx / shift, ty / shift, scale_w, tf.cos(theta) - 1.0, tf.sin(theta),
                     aniso_w * tf.cos(aniso_r), aniso_w * tf.sin(aniso_r)], axis=1)


def _rotation(a):
    from ..compat import tf

    c, s = tf.cos(a), tf.sin(a)
    return tf.stack([tf.stack([c, -s], -1), tf.stack([s, c], -1)], -2)  # (B, 2, 2)


def inverse_matrices(params, size: int):
    """(B, 2, 3): output pixel (x, y, 1) -> the input point it samples, pixel centres at integers, x the column.

    The forward map is y = A(x) with A = geometric . translate . flip about the image centre, geometric =
    scale(s) . rotate(theta) . aniso (EDM's order); this is A's inverse, as resampling needs."""
    from ..compat import tf

    flip, tx, ty, scale_w, theta, aniso_w, aniso_r = tf.unstack(params, axis=1)
    s = tf.pow(2.0, scale_w * SCALE_STD)
    a = tf.pow(2.0, aniso_w * ANISO_STD)
    # aniso^-1 = R(r) diag(1/a, a) R(-r); rotate^-1 = R(-theta); scale^-1 = 1/s.
    aniso_inv = _rotation(aniso_r) @ tf.linalg.diag(tf.stack([1.0 / a, a], -1)) @ _rotation(-aniso_r)
    geo_inv = aniso_inv @ _rotation(-theta) / s[:, None, None]
    flip_m = tf.linalg.diag(tf.stack([1.0 - 2.0 * flip, tf.ones_like(flip)], -1))  # its own inverse
    m = flip_m @ geo_inv  # (B, 2, 2): centred output -> centred input
    c = (size - 1) / 2.0
    centre = tf.fill([tf.shape(params)[0], 2, 1], c)
    shift = tf.stack([tx, ty], -1)[:, :, None]
    # input = c + F (G^-1 (out - c) - t): undo the geometric map, then the shift, then the flip
    offset = centre - m @ centre - flip_m @ shift
    return tf.concat([m, offset], axis=2)


def apply(x, params):
    """x (B, S, S, C) float32 transformed by its images' parameters (B, 7); untransformed images are returned
    as they are, bit for bit."""
    from ..compat import tf

    size = int(x.shape[1])
    m = inverse_matrices(params, size)  # (B, 2, 3)
    b = tf.shape(x)[0]
    transforms = tf.concat([tf.reshape(m, [b, 6]), tf.zeros([b, 2])], axis=1)  # projective, no perspective
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")
    identity = tf.reduce_all(tf.equal(params, 0.0), axis=1)
    return tf.where(identity[:, None, None, None], x, warped)
