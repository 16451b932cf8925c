"""The paper's autoencoder (AE) method and its data-aware variant: options (presets and
budget arithmetic), trainer, and the two registered methods."""

from aecompress.methods.autoencoder.method import Autoencoder, DataAwareAutoencoder
from aecompress.methods.autoencoder.options import (
    PAPER_PRESET,
    AutoencoderOptions,
    DataAwareOptions,
    solve_latent_width,
    stored_cost,
)

__all__ = [
    "PAPER_PRESET",
    "Autoencoder",
    "AutoencoderOptions",
    "DataAwareAutoencoder",
    "DataAwareOptions",
    "solve_latent_width",
    "stored_cost",
]
