"""The trainable diffusion model: a `keras.Model` whose `train_step` does the (weighted) MSE of the
configured prediction (eps, v or x0) and EMA, and the optimizer it is compiled with. A network with labels
is trained on (images, labels) batches with label dropout, which trains the unconditional branch that
classifier-free guidance needs in the same network (Ho & Salimans 2022, Algorithm 1). A network with augmentation
conditioning is trained on (images, labels, augmentation vectors) batches (data/augment.py)."""

from __future__ import annotations

from . import compat
from .compat import keras, tf
from .schedule import extract, loss_weight, prediction_target
from .unet import network_inputs, num_labels_of


def ema_decay_at(step, decay: float, warmup: bool):
    """EMA decay at optimizer step `step`: min(decay, (1 + step) / (10 + step)) with warm-up.

    The warm-up (as in TensorFlow's ExponentialMovingAverage with num_updates) lets the EMA follow
    the network closely at first, so previews early in a run are not the random initialisation.
    """
    if not warmup:
        return tf.constant(decay, tf.float32)
    step = tf.cast(step, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + step) / (10.0 + step))


class DiffusionModel(keras.Model):
    """Wraps the U-Net `net`, its EMA copy `ema_net` and the schedule; `fit` trains the `prediction`."""

    def __init__(self, net, ema_net, schedule, train_cfg, prediction: str = "eps", **kwargs):
        super().__init__(name="diffusion", **kwargs)
        self.net = net
        self.ema_net = ema_net
        self.ema_net.trainable = False
        self.schedule = schedule
        self.ema_decay = float(train_cfg.ema_decay)
        self.ema_warmup = bool(train_cfg.ema_warmup)
        self.grad_clip = float(train_cfg.grad_clip)
        self.prediction = prediction
        self.min_snr_gamma = float(train_cfg.min_snr_gamma) if train_cfg.loss_weighting == "min_snr" else None
        self.num_labels = num_labels_of(net)
        self.label_dropout = float(train_cfg.label_dropout)
        # train.accumulate: each batch (of accumulate x batch_size images) is taken in micro-batches of batch_size.
        self.accumulate, self.micro_batch = int(train_cfg.accumulate), int(train_cfg.batch_size)
        # t and eps for callers of diffusion_loss that pass none (train_step draws its own, stateless, in `draws`);
        # checkpointed with the run.
        self.rng = tf.random.Generator.from_seed(train_cfg.seed)
        self.seed = int(train_cfg.seed)
        # Counts train steps; with the seed it keys each step's draws (stateless, so every replica can draw the
        # whole global batch's and take its own slice). One value for all replicas, updated by the first.
        self.ema_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        for w, e in zip(net.weights, ema_net.weights):
            e.assign(w)
        # Built already (its networks are): Keras 3 under a tf.distribute strategy otherwise builds the model by
        # calling it on a training batch, which is not the networks' input.
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def drop_labels(self, labels, uniform):
        """Labels (B, K) with each row replaced by the null label (all zero) with probability label_dropout;
        `uniform` (B,) are the rows' U[0, 1) draws."""
        keep = uniform >= self.label_dropout
        return labels * tf.cast(keep, labels.dtype)[:, None]

    def diffusion_loss(self, x0, labels=None, training: bool = True, t=None, eps=None, augment=None, total=None):
        """Draw t ~ U{0..T-1} and eps ~ N(0, I) (unless given); return the weighted MSE of the prediction.

        With eps and no weighting this is Eq. 14 of Ho et al. 2020 (L_simple). A network with labels gets
        `labels` (B, K) as they are (the caller drops them for classifier-free guidance), a network with
        augmentation conditioning `augment` (B, DIM); either is zero when not given. With `total`, the sum over
        these images divided by `total` (their share of the mean over a global batch of `total` images).
        """
        if t is None:
            t = self.rng.uniform([tf.shape(x0)[0]], 0, self.schedule.timesteps, dtype=tf.int32)
        if eps is None:
            eps = self.rng.normal(tf.shape(x0), dtype=tf.float32)
        x_t = self.schedule.q_sample(x0, t, eps)
        pred = self.net(network_inputs(self.net, x_t, t, labels, augment), training=training)
        sqrt_alpha_bar = extract(self.schedule.sqrt_alpha_bar, t)
        sigma = extract(self.schedule.sqrt_one_minus_alpha_bar, t)
        target = prediction_target(self.prediction, x0, eps, sqrt_alpha_bar, sigma)
        per_example = tf.reduce_mean(tf.square(tf.cast(pred, tf.float32) - target), axis=[1, 2, 3])
        weights = loss_weight(self.prediction, tf.gather(self.schedule.snr, t), self.min_snr_gamma)
        if total is None:
            return tf.reduce_mean(weights * per_example)
        return tf.reduce_sum(weights * per_example) / tf.cast(total, tf.float32)

    def train_step(self, data):
        # A batch is x0, (x0, labels) or (x0, labels, augment) with labels (B, 0) on a run without any. Under a
        # tf.distribute strategy this runs once per replica on the replica's part of the global batch.
        batch = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        x0, labels, augment = batch + (None,) * (3 - len(batch))
        x0 = tf.cast(x0, tf.float32)
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync
        offset, total = self.place_in_global_batch(replica, tf.shape(x0)[0])
        labels, t, eps = self.draws(x0, labels if self.num_labels else None, offset, replicas)
        variables = self.net.trainable_variables
        if self.accumulate > 1:
            loss, grads = self.accumulated_gradients(variables, x0, labels, augment, t, eps, total=total)
            scale = compat.current_loss_scale(self.optimizer)
        else:
            loss, grads, scale = compat.loss_scaled_gradients(
                self.optimizer, lambda: self.diffusion_loss(x0, labels, t=t, eps=eps, augment=augment, total=total),
                variables)
        if replicas > 1:
            loss = replica.all_reduce(tf.distribute.ReduceOp.SUM, loss)  # the global batch's mean, on every replica
        if self.grad_clip > 0:
            if replicas > 1:  # clip the gradient of the global batch: sum over the replicas first
                grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            # The gradients may still carry the loss scale (Keras 3): clipping at clip * scale is the same
            # as unscaling, clipping and rescaling. A non-finite norm stays non-finite, so the loss
            # scaler still sees (and skips) an overflowing step.
            grads, _ = tf.clip_by_global_norm(grads, self.grad_clip * tf.cast(scale, tf.float32))
            compat.apply_summed_gradients(self.optimizer, grads, variables, replicas)
        else:
            self.optimizer.apply_gradients(zip(grads, variables))  # the optimizer sums over replicas
        self.update_ema()
        self.loss_tracker.update_state(loss)
        return compat.step_outputs({"loss": self.loss_tracker.result(), "step_loss": loss})

    @staticmethod
    def place_in_global_batch(replica, b):
        """(offset, total): where this replica's `b` images start in the global batch, and its size. The strategy
        hands replica r the r-th contiguous part (a last, partial batch may leave some replicas fewer or none)."""
        if replica.num_replicas_in_sync == 1:
            return 0, b
        # Every replica's size, as a sum of one-hot rows: an all-reduce, which XLA compiles (an all-gather it does not).
        mine = tf.one_hot(replica.replica_id_in_sync_group, replica.num_replicas_in_sync, dtype=tf.float32)
        sizes = tf.cast(replica.all_reduce(tf.distribute.ReduceOp.SUM, mine * tf.cast(b, tf.float32)), tf.int32)
        return tf.reduce_sum(sizes[:replica.replica_id_in_sync_group]), tf.reduce_sum(sizes)

    def draws(self, x0, labels, offset, replicas: int):
        """(labels after dropout, t, eps) for this replica's images: the draws of a whole global batch, keyed by
        (seed, step) alone and sliced at `offset`, so an image gets the same t and eps whatever the replica count,
        the micro-batching, or a resume. A global batch's worth is drawn even for a last, smaller batch: a size
        that XLA knows when it compiles (the per-replica shape), which a sum over replicas would not be."""
        b = tf.shape(x0)[0]
        n = tf.maximum(self.micro_batch * self.accumulate * replicas, replicas * b)
        keys = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(self.seed, tf.int64), tf.convert_to_tensor(self.ema_updates)]), 3)

        def mine(z):  # z[offset:offset + b] as a slice of a size XLA knows (a strided slice's size it does not)
            rest = tf.rank(z) - 1
            return tf.slice(z, tf.concat([[offset], tf.zeros([rest], tf.int32)], 0),
                            tf.concat([[b], -tf.ones([rest], tf.int32)], 0))

        if labels is not None:
            labels = self.drop_labels(tf.cast(labels, tf.float32),
                                      mine(tf.random.stateless_uniform([n], keys[0], dtype=tf.float32)))
        t = mine(tf.random.stateless_uniform([n], keys[1], 0, self.schedule.timesteps, dtype=tf.int32))
        eps = mine(tf.random.stateless_normal(tf.concat([[n], tf.shape(x0)[1:]], 0), keys[2], dtype=tf.float32))
        return labels, t, eps

    def accumulated_gradients(self, variables, x0, *per_example, total):
        """(loss, gradients) of this replica's images from micro-batches of `micro_batch` images, one after another
        (train.accumulate): each micro-batch's loss is its sum over `total` (diffusion_loss), so the summed
        gradients are those of the global batch's mean loss; only one micro-batch's activations are alive at a time.

        `per_example` are (labels, augment, t, eps), each None or batch-major. A last, smaller batch of an epoch
        splits into fewer or smaller micro-batches. The gradients carry the loss scale as loss_scaled_gradients'
        do (the scale is fixed within a step)."""
        b = tf.shape(x0)[0]
        micro = self.micro_batch
        count = (b + micro - 1) // micro

        def body(i, loss_sum, grad_sums):
            def part(z):
                return None if z is None else z[i * micro:(i + 1) * micro]

            xi = part(x0)
            labels, augment, t, eps = (part(z) for z in per_example)
            loss, grads, _ = compat.loss_scaled_gradients(
                self.optimizer, lambda: self.diffusion_loss(xi, labels, t=t, eps=eps, augment=augment, total=total),
                variables)
            grads = [tf.zeros_like(v) if g is None else tf.cast(g, v.dtype) for g, v in zip(grads, variables)]
            return i + 1, loss_sum + loss, [s + g for s, g in zip(grad_sums, grads)]

        start = (tf.constant(0), tf.constant(0.0), [tf.zeros_like(v) for v in variables])
        _, loss, grads = tf.while_loop(lambda i, *_: i < count, body, start)
        return loss, grads

    def update_ema(self):
        """ema <- d * ema + (1 - d) * w for every weight of the network."""
        d = ema_decay_at(self.ema_updates, self.ema_decay, self.ema_warmup)
        for w, e in zip(self.net.weights, self.ema_net.weights):
            # e -= (1 - d) * (e - w), as one fused kernel per weight.
            tf.raw_ops.ResourceApplyGradientDescent(var=compat.handle(e), alpha=1.0 - d, delta=e - w)
        self.ema_updates.assign_add(1)


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear learning-rate warm-up from lr / warmup_steps to lr, then constant (DDPM: 5,000 steps on CIFAR-10)."""

    def __init__(self, learning_rate: float, warmup_steps: int):
        self.learning_rate, self.warmup_steps = float(learning_rate), int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        return self.learning_rate * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def make_optimizer(train_cfg):
    """Adam with optional warm-up; float16 gets dynamic loss scaling (bfloat16 needs none)."""
    lr = train_cfg.learning_rate
    if train_cfg.warmup_steps > 0:
        lr = WarmupSchedule(lr, train_cfg.warmup_steps)
    optimizer = compat.adam(lr)
    if train_cfg.precision == "mixed_float16":
        optimizer = compat.loss_scale_optimizer(optimizer)
    return optimizer


def build_diffusion_model(cfg, seed: int, num_labels: int = 0):
    """Network, EMA copy and compiled DiffusionModel for a config, in its precision (with `num_labels` labels
    when the data has them, and augmentation conditioning when train.augment_p is on); returns (model, xla)."""
    from .data.augment import network_dim
    from .distribute import xla_problem
    from .precision import apply_policy, use_xla
    from .schedule import Schedule
    from .unet import build_unet

    apply_policy(cfg.train.precision)
    keras.utils.set_random_seed(seed)
    size, channels = cfg.data.image_size, cfg.data.channels
    augment_dim = network_dim(cfg.train.augment_p)
    net = build_unet(cfg.model, size, channels, name="unet", num_labels=num_labels, augment_dim=augment_dim)
    ema_net = build_unet(cfg.model, size, channels, name="ema_unet", num_labels=num_labels, augment_dim=augment_dim)
    model = DiffusionModel(net, ema_net, Schedule.from_config(cfg.diffusion), cfg.train, cfg.diffusion.prediction)
    # The accumulation loop (micro-batches of a dynamic count and size) did not finish compiling under XLA in
    # 15 minutes on a CPU (TF 2.21): accumulated steps run as plain graphs; so do steps of several CPU replicas.
    xla = use_xla(cfg.train.jit_compile) and cfg.train.accumulate == 1 and xla_problem() is None
    model.compile(optimizer=make_optimizer(cfg.train), **compat.compile_kwargs(xla))
    return model, xla
