"""The noise-prediction U-Net: (x_t, t[, labels]) -> prediction. Knows nothing of schedules or files.

Layout (Ho et al. 2020, Appendix B; the reference keras-io design): conv in; per level `num_res_blocks`
residual blocks (self-attention after each at `attention_resolutions`) and a stride-2 conv down;
a bottleneck of residual, attention, residual; per level going up `num_res_blocks + 1` residual
blocks, each fed the matching skip, and a nearest upsample + conv; GroupNorm, swish, conv out.
Every layer has an explicit, unique name: the portable weight export keys on those names.

A run with labels (classes or tags) adds a third input, a (B, K) multi-hot vector, whose embedding is added
to the time embedding (as diffusers' class embedding and guided-diffusion's label_emb are); an all-zero
vector is the null label of classifier-free guidance. Without labels the network is exactly the unlabelled
one: same inputs, layers and parameter count.

A run with non-leaky augmentation (data/augment.py) adds a last input, the (B, augment.DIM) vector of the
transform an image went through, mapped by a bias-free linear layer onto the sinusoidal time embedding (EDM's
map_augment, here starting at zero); sampling feeds zeros, which add nothing. `network_inputs` builds the input list for any of them.

With `model.recompute` (gradient checkpointing) the same functional network is called through the pass that built
it, with each residual block under `tf.recompute_grad`: the same layers, weights and checkpoints, less memory.
"""

from __future__ import annotations

import functools
import math
import re

from .compat import keras, tf

layers = keras.layers


def _init(scale: float = 1.0):
    """DDPM's default_init: variance scaling, fan_avg, uniform; scale 0 gives zeros."""
    if scale == 0.0:
        return "zeros"
    return keras.initializers.VarianceScaling(scale, mode="fan_avg", distribution="uniform")


def _float32(x):
    """x as float32 through a real Cast op, even when x already is float32.

    oneDNN's bfloat16 auto-mixed-precision pass (precision.py) runs the element-wise ops that follow a
    convolution in bfloat16, whose CPU kernels are slow, with casts around them; it leaves the ops after
    a Cast it did not insert alone, so group statistics and normalisation stay in float32.
    """
    return tf.raw_ops.Cast(x=x, DstT=tf.float32)


def _group_mean(per_channel, groups: int, n):
    """(B, C) per-channel sums -> (B, C): each channel gets the sum over its group divided by n."""
    b, c = tf.shape(per_channel)[0], per_channel.shape[-1]
    g = tf.reshape(per_channel, [b, groups, c // groups])
    mean = tf.reduce_sum(g, axis=-1, keepdims=True) / n
    return tf.reshape(tf.broadcast_to(mean, tf.shape(g)), [b, c])


def _bcast(v):
    """(B, C) -> (B, 1, 1, C), to broadcast over the image."""
    return v[:, None, None, :]


def group_norm(x, gamma, beta, groups: int, epsilon: float = 1e-5, swish: bool = False):
    """Group normalisation of x (B, H, W, C) with float32 gamma, beta (C,), optionally fused with swish.

    The gradient is written out (Wu & He 2018, Eq. 3 differentiated) instead of left to autodiff of
    moments, reshapes and broadcasts: about half the element-wise passes over the activations.
    Statistics are float32 whatever the dtype of x; y and dx have the dtype of x.
    """

    @tf.custom_gradient
    def norm(x, gamma, beta):
        xf = _float32(x)
        shape = tf.shape(x)
        n = tf.cast(shape[1] * shape[2] * (x.shape[-1] // groups), tf.float32)
        # One pass for both moments: var = E[x^2] - E[x]^2 per group (float32 sums).
        mean = _group_mean(tf.reduce_sum(xf, [1, 2]), groups, n)  # (B, C)
        mean_sq = _group_mean(tf.reduce_sum(tf.square(xf), [1, 2]), groups, n)
        rstd = tf.math.rsqrt(tf.maximum(mean_sq - tf.square(mean), 0.0) + epsilon)
        scale = rstd * gamma  # normalisation and affine transform folded: z = x * scale + offset
        z = xf * _bcast(scale) + _bcast(beta - mean * scale)
        sig = tf.sigmoid(z) if swish else None
        y = z * sig if swish else z

        def grad(dy):
            dz = _float32(dy)
            if swish:  # d/dz z*sig(z) = sig + z*sig*(1 - sig) = sig + y*(1 - sig)
                dz = dz * (sig + y * (1.0 - sig))
            dx, dgamma, dbeta = _group_norm_grad(dz, xf, gamma, mean, rstd, groups, n)
            return tf.cast(dx, x.dtype), dgamma, dbeta

        return tf.cast(y, x.dtype), grad

    return norm(x, gamma, beta)


def _group_norm_grad(dz, xf, gamma, mean, rstd, groups: int, n):
    """Gradients of z = xhat * gamma + beta, xhat = (x - mean) * rstd per group, given dz = dL/dz."""
    sum_dz = tf.reduce_sum(dz, [1, 2])  # (B, C)
    sum_dz_xhat = rstd * (tf.reduce_sum(dz * xf, [1, 2]) - mean * sum_dz)
    # dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)) with dxhat = dz * gamma,
    # regrouped as dz * (rstd * gamma) + xf * q + r so only three products touch the activations.
    m1 = _group_mean(sum_dz * gamma, groups, n)
    m2 = _group_mean(sum_dz_xhat * gamma, groups, n)
    q = -rstd * rstd * m2
    r = rstd * (mean * rstd * m2 - m1)
    dx = dz * _bcast(rstd * gamma) + (xf * _bcast(q) + _bcast(r))
    return dx, tf.reduce_sum(sum_dz_xhat, 0), tf.reduce_sum(sum_dz, 0)


class GroupNorm(layers.Layer):
    """Group normalisation (Wu & He 2018), optionally fused with swish: a Keras layer around `group_norm`.

    Written here rather than taken from Keras because TF 2.10 has no GroupNormalization layer; one
    implementation keeps both TensorFlow lines numerically identical. Statistics are computed in
    float32 whatever the input dtype, so it is safe under mixed precision.
    """

    def __init__(self, groups: int, swish: bool = False, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.swish, self.epsilon = groups, swish, epsilon

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(f"{self.name}: {self.groups} groups do not divide {channels} channels")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        # Weights enter as float32 tensors, not variables: custom_gradient then needs no `variables`.
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        return group_norm(x, gamma, beta, self.groups, self.epsilon, self.swish)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "swish": self.swish, "epsilon": self.epsilon}


class TimeEmbedding(layers.Layer):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim

    def call(self, t):
        half = self.dim // 2
        freqs = tf.exp(tf.range(half, dtype=tf.float32) * -(math.log(10000.0) / (half - 1)))
        angles = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
        return tf.cast(tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


class AddTimeEmbedding(layers.Layer):
    """h (B, H, W, C) + projected time embedding (B, C) broadcast over the image."""

    def call(self, inputs):
        h, emb = inputs
        return h + tf.cast(emb, h.dtype)[:, None, None, :]


class LabelEmbedding(layers.Layer):
    """(B, K) multi-hot labels -> (B, dim): the sum of the active labels' embeddings, or a learned null
    embedding when none is active (the unconditional branch of classifier-free guidance, Ho & Salimans 2022).

    One class is a one-hot row; tags are several ones, whose embeddings add. The null embedding is a weight
    of its own, so "no label" is never any real class's embedding, nor the sum of none (zero).
    """

    def __init__(self, num_labels: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_labels, self.dim = num_labels, dim

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=(self.num_labels, self.dim), initializer=_init())
        self.null = self.add_weight(name="null", shape=(self.dim,), initializer=_init())
        super().build(input_shape)

    def call(self, labels):
        labels = tf.cast(labels, self.compute_dtype)  # (B, K)
        is_null = tf.cast(tf.reduce_max(labels, axis=-1, keepdims=True) <= 0, self.compute_dtype)  # (B, 1)
        emb = tf.matmul(labels, tf.cast(self.embeddings, self.compute_dtype))
        return emb + is_null * tf.cast(self.null, self.compute_dtype)[None, :]

    def get_config(self):
        return {**super().get_config(), "num_labels": self.num_labels, "dim": self.dim}


class SelfAttention(layers.Layer):
    """Multi-head dot-product attention over all H*W positions, from fused q|k|v (B, H, W, 3C).

    Batched matmuls over flattened positions; the softmax runs in float32.
    """

    def __init__(self, heads: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def call(self, qkv):
        shape = tf.shape(qkv)
        b, h, w = shape[0], shape[1], shape[2]
        c = qkv.shape[-1] // 3
        d = c // self.heads
        q, k, v = tf.split(tf.reshape(qkv, [b, h * w, 3 * c]), 3, axis=-1)  # (B, N, C) each
        if self.heads > 1:  # (B, N, C) -> (B, heads, N, d)
            q, k, v = (tf.transpose(tf.reshape(z, [b, h * w, self.heads, d]), [0, 2, 1, 3]) for z in (q, k, v))
        scores = tf.matmul(q, k, transpose_b=True) * (d ** -0.5)  # (B, [heads,] N, N)
        weights = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1), v.dtype)
        out = tf.matmul(weights, v)
        if self.heads > 1:
            out = tf.transpose(out, [0, 2, 1, 3])
        return tf.reshape(out, [b, h, w, c])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


@tf.custom_gradient
def upsample2x(x):
    """Nearest-neighbour 2x upsampling of x (B, H, W, C) by reshape and broadcast."""
    shape = tf.shape(x)
    b, h, w = shape[0], shape[1], shape[2]
    c = x.shape[-1]
    y = tf.broadcast_to(tf.reshape(x, [b, h, 1, w, 1, c]), [b, h, 2, w, 2, c])

    def grad(dy):
        # Each input pixel feeds one 2x2 block, so its gradient is the block's sum. As 4 x a 2x2 average
        # pool (exact: powers of two) it is one oneDNN kernel; autodiff's sum over axes 2 and 4 of a
        # 6-D tensor is about ten times slower on the CPU.
        return tf.nn.avg_pool2d(dy, 2, 2, "VALID") * tf.constant(4.0, dy.dtype)

    return tf.reshape(y, [b, h * 2, w * 2, c]), grad


class Upsample2x(layers.Layer):
    """Nearest-neighbour 2x upsampling: a Keras layer around `upsample2x`.

    Unlike UpSampling2D its gradient is an average pool, which XLA compiles on every device
    (TF 2.10's XLA refuses ResizeNearestNeighborGrad on the CPU).
    """

    def call(self, x):
        return upsample2x(x)


class _Layers:
    """Each layer made once, by name: building the graph creates it, a recomputing forward pass reuses it.

    `init` is the scale of the kernel initializer (`_init`), made only with the layer: a Keras 3 initializer
    draws its seed when made, so one made and thrown away on a second pass would shift later draws.
    """

    def __init__(self):
        self.made: dict[str, layers.Layer] = {}
        self.done = False  # set once the graph is built: a recomputing pass must create nothing

    def __call__(self, cls, name: str, *args, init: float | None = None, **kwargs):
        if name not in self.made:
            assert not self.done, f"{name}: a layer the graph does not have"
            if init is not None:
                kwargs["kernel_initializer"] = _init(init)
            self.made[name] = cls(*args, name=name, **kwargs)
        return self.made[name]


def _direct(fn, *tensors):
    """fn(*tensors), its activations kept for the backward pass as usual."""
    return fn(*tensors)


def _recomputed(fn, *tensors):
    """fn(*tensors), keeping only its inputs for the backward pass, which runs it again (gradient checkpointing,
    Chen et al. 2016): the activations inside cost memory one block at a time instead of all at once."""
    return tf.recompute_grad(fn)(*tensors)


def _res_block(make, x, temb_act, width: int, cfg, name: str, part=_direct):
    """Residual block: GN-swish-conv, + time embedding, GN-swish-dropout-conv(zero init), + skip.

    `part(fn, *tensors)` runs its parts: `_recomputed` recomputes them in the backward pass. Dropout stays
    between two parts, outside any: run again, it would draw another mask than the forward pass used.
    """

    def norms(x, temb_act):
        h = make(GroupNorm, f"{name}_norm1", cfg.norm_groups, swish=True)(x)
        h = make(layers.Conv2D, f"{name}_conv1", width, 3, padding="same", init=1.0)(h)
        emb = make(layers.Dense, f"{name}_temb", width, init=1.0)(temb_act)
        h = make(AddTimeEmbedding, f"{name}_addtemb")([h, emb])
        return make(GroupNorm, f"{name}_norm2", cfg.norm_groups, swish=True)(h)

    def out(h, x):
        h = make(layers.Conv2D, f"{name}_conv2", width, 3, padding="same", init=0.0)(h)
        if x.shape[-1] != width:
            x = make(layers.Conv2D, f"{name}_skip", width, 1, init=1.0)(x)
        return make(layers.Add, f"{name}_add")([x, h])

    if cfg.dropout == 0:
        return part(lambda x, temb_act: out(norms(x, temb_act), x), x, temb_act)
    h = part(norms, x, temb_act)
    h = make(layers.Dropout, f"{name}_dropout", cfg.dropout)(h)
    return part(out, h, x)


def _attn_block(make, x, cfg, name: str):
    """Self-attention block with a residual connection; the output projection starts at zero."""
    width = x.shape[-1]
    h = make(GroupNorm, f"{name}_norm", cfg.norm_groups)(x)
    qkv = make(layers.Dense, f"{name}_qkv", 3 * width, init=1.0)(h)
    h = make(SelfAttention, f"{name}_core", cfg.attention_heads)(qkv)
    h = make(layers.Dense, f"{name}_proj", width, init=0.0)(h)
    return make(layers.Add, f"{name}_add")([x, h])


def build_unet(model_cfg, image_size: int, channels: int, name: str = "unet", num_labels: int = 0,
               augment_dim: int = 0) -> keras.Model:
    """The U-Net a `ModelConfig` describes, for square images of `image_size` with `channels` channels;
    with `num_labels` > 0 it takes (B, num_labels) multi-hot labels (all zero: unconditional) after t, with
    `augment_dim` > 0 (B, augment_dim) augmentation conditioning last (all zero: not augmented)."""
    inputs = [keras.Input(shape=(image_size, image_size, channels), name="x_t"),
              keras.Input(shape=(), dtype="int32", name="t")]
    if num_labels:
        inputs.append(keras.Input(shape=(num_labels,), dtype="float32", name="labels"))
    if augment_dim:
        inputs.append(keras.Input(shape=(augment_dim,), dtype="float32", name="augment"))
    make = _Layers()
    forward = functools.partial(_forward, make, cfg=model_cfg, num_labels=num_labels, augment_dim=augment_dim)
    out = forward(inputs)
    make.done = True
    if not model_cfg.recompute:
        return keras.Model(inputs, out, name=name)
    return RecomputingUNet(inputs, out, functools.partial(forward, part=_recomputed), name=name)


class RecomputingUNet(keras.Model):
    """The functional U-Net, called through `forward` (the pass that built its graph, on the same layers) with
    its residual blocks recomputed in the backward pass (`model.recompute`).

    Its layers, weights and checkpoint are the plain network's: only the call differs, so a run may turn
    recomputation on or off, and exports load either way.
    """

    def __init__(self, inputs, outputs, forward, name: str):
        super().__init__(inputs=inputs, outputs=outputs, name=name)
        self._forward = forward

    def call(self, inputs, training=None):
        # Layers called inside take `training` from this call (dropout), as in the functional graph.
        return self._forward(list(inputs))


def _forward(make, inputs: list, cfg, num_labels: int, augment_dim: int, part=_direct):
    """The U-Net's forward pass on `inputs` ([x_t, t, labels?, augment?]), with layers from `make`;
    `part` runs the parts of residual blocks (`_res_block`)."""
    x_t, t, *extra = inputs
    labels = extra.pop(0) if num_labels else None
    augment = extra.pop(0) if augment_dim else None
    image_size, channels = x_t.shape[1], x_t.shape[-1]
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    attn = [image_size // 2**i in cfg.attention_resolutions for i in range(len(widths))]
    temb_dim = cfg.base_channels * 4

    temb = make(TimeEmbedding, "temb_sinusoid", temb_dim)(t)
    if augment is not None:
        # Zero at first, so the augmented network starts as the plain one (and draws no initial values of its own:
        # with the same seed every other weight equals the plain network's).
        aug_emb = make(layers.Dense, "augment_emb", temb_dim, use_bias=False, kernel_initializer="zeros")(augment)
        temb = make(layers.Add, "temb_add_augment")([temb, aug_emb])
    temb = make(layers.Dense, "temb_dense1", temb_dim, activation="swish", init=1.0)(temb)
    temb = make(layers.Dense, "temb_dense2", temb_dim, init=1.0)(temb)
    if labels is not None:
        label_emb = make(LabelEmbedding, "label_emb", num_labels, temb_dim)(labels)
        temb = make(layers.Add, "temb_add_labels")([temb, label_emb])
    # Every residual block projects swish(temb); computing the swish once is the same maths.
    temb_act = make(layers.Activation, "temb_swish", "swish")(temb)

    # Encoder: (B, S, S, C) -> (B, S / 2**(L-1), ...), keeping every intermediate for the skips.
    h = make(layers.Conv2D, "conv_in", widths[0], 3, padding="same", init=1.0)(x_t)
    skips = [h]
    for level, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            h = _res_block(make, h, temb_act, width, cfg, f"down{level}_res{j}", part)
            if attn[level]:
                h = _attn_block(make, h, cfg, f"down{level}_attn{j}")
            skips.append(h)
        if level != len(widths) - 1:
            h = make(layers.Conv2D, f"down{level}_downsample", width, 3, strides=2, padding="same", init=1.0)(h)
            skips.append(h)

    # Bottleneck.
    h = _res_block(make, h, temb_act, widths[-1], cfg, "mid_res0", part)
    h = _attn_block(make, h, cfg, "mid_attn")
    h = _res_block(make, h, temb_act, widths[-1], cfg, "mid_res1", part)

    # Decoder: one more block per level than going down, each consuming one skip.
    for level in reversed(range(len(widths))):
        for j in range(cfg.num_res_blocks + 1):
            h = make(layers.Concatenate, f"up{level}_concat{j}")([h, skips.pop()])
            h = _res_block(make, h, temb_act, widths[level], cfg, f"up{level}_res{j}", part)
            if attn[level]:
                h = _attn_block(make, h, cfg, f"up{level}_attn{j}")
        if level != 0:
            h = make(Upsample2x, f"up{level}_upsample")(h)
            h = make(layers.Conv2D, f"up{level}_upconv", widths[level], 3, padding="same", init=1.0)(h)
    assert not skips

    h = make(GroupNorm, "out_norm", cfg.norm_groups, swish=True)(h)
    h = make(layers.Conv2D, "out_conv", channels, 3, padding="same", init=0.0)(h)
    # The prediction leaves the network in float32 whatever the compute policy: the loss needs it.
    return make(layers.Activation, "out", "linear", dtype="float32")(h)


def _layer_or_none(net, name: str):
    try:
        return net.get_layer(name)
    except (AttributeError, ValueError):  # not a Keras model (a test's denoiser), or no such layer
        return None


def num_labels_of(net) -> int:
    """K of a network built with `num_labels` = K labels, 0 for an unlabelled one (or any other denoiser)."""
    layer = _layer_or_none(net, "label_emb")
    return int(layer.num_labels) if layer is not None else 0


def augment_dim_of(net) -> int:
    """Width of a network's augmentation conditioning input, 0 for a network without one."""
    layer = _layer_or_none(net, "augment_emb")
    return int(layer.kernel.shape[0]) if layer is not None else 0


def network_inputs(net, x_t, t, labels=None, augment=None) -> list:
    """The input list of `net` for a batch: labels (all zero when not given: the null label) if it takes them,
    then augmentation conditioning (all zero when not given: not augmented, as in sampling) if it takes it."""
    inputs = [x_t, t]
    batch = tf.shape(x_t)[0]
    for width, given in ((num_labels_of(net), labels), (augment_dim_of(net), augment)):
        if width:
            inputs.append(tf.zeros([batch, width]) if given is None else given)
    return inputs


def layer_flops(layer) -> float:
    """Multiply-adds x 2 of one layer of `build_unet` for one image, from its shapes (0: element-wise work)."""
    if isinstance(layer, layers.Conv2D):
        out_h, out_w = layer.output.shape[1:3]
        k = layer.kernel.shape
        return 2.0 * out_h * out_w * k[0] * k[1] * k[2] * k[3]
    if isinstance(layer, layers.Dense) and len(layer.output.shape) == 4:
        out_h, out_w = layer.output.shape[1:3]
        return 2.0 * out_h * out_w * layer.kernel.shape[0] * layer.kernel.shape[1]
    if isinstance(layer, SelfAttention):
        n = layer.output.shape[1] * layer.output.shape[2]
        return 2.0 * 2 * n * n * layer.output.shape[3]  # QK^T and AV
    return 0.0


def forward_flops(model_cfg, image_size: int, channels: int) -> float:
    """Multiply-adds x 2 of one forward pass for one image, counted from the layer shapes."""
    return sum(layer_flops(layer) for layer in build_unet(model_cfg, image_size, channels).layers)


def residual_block(name: str) -> str | None:
    """The residual block (e.g. `down0_res1`) a layer of `build_unet`, or an op under its name, belongs to;
    None outside them. Those blocks are what `model.recompute` runs again in the backward pass."""
    found = re.search(r"(?:^|/)((?:down\d+|mid|up\d+)_res\d+)_", name)
    return found.group(1) if found else None
