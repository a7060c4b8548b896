"""ddpm_tf: denoising diffusion models (Ho et al. 2020) on your own images, in TensorFlow/Keras."""

__version__ = "0.1.0"
