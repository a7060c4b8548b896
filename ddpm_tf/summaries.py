"""TensorBoard scalars and images written with TensorFlow core alone (no tensorboard package needed)."""

from __future__ import annotations

from .compat import tf


# The newest tensorflow-cpu no longer installs tensorboard, where `tf.summary.scalar/image` live. Their
# on-disk formats are simple: a tensor tagged with the plugin's name. `tf.summary.write` is TF core.
def _plugin_metadata(plugin: str):
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def scalar_summary(tag: str, value, step: int) -> None:
    """A TensorBoard scalar (the scalars plugin's format: one float32)."""
    tf.summary.write(tag, tf.cast(value, tf.float32), step=step, metadata=_plugin_metadata("scalars"))


def image_summary(tag: str, image, png: bytes, step: int) -> None:
    """A TensorBoard image (the images plugin's format: [width, height, PNG bytes])."""
    tensor = tf.constant([str(image.shape[1]).encode(), str(image.shape[0]).encode(), png])
    tf.summary.write(tag, tensor, step=step, metadata=_plugin_metadata("images"))
