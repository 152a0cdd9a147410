"""The model in PyTorch: config, networks (image VAE, mask autoencoder, denoiser), checkpoints.

The names of the former module ``msld_export.model`` are re-exported here (deprecated: import
them from ``msld_export.model.networks``)."""
from .networks import (ExportDecoder, ExportDenoiser, ExportEncoder, MedSegLatDiff,  # noqa: F401
                       alphas_cumprod, eps_from_output, weighted_bce)
