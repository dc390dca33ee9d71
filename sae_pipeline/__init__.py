"""sae-stability: stability and steerability of sparse-autoencoder features.

One module per pipeline stage (``cache``, ``train``, ``match``, ``autointerp``, ``steer``,
``evaluate``, ``regress``); shared pieces live in ``atomic`` (crash-safe writes), ``config``
(settings and the variant grid), ``shards`` (Parquet activation shards), ``checkpoint`` (SAE files in
SAELens layout), ``subject`` (subject model loading) and ``judge`` (the LLM judge client).
"""

__version__ = "0.1.0"
