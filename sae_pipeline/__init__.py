"""sae-stability: stability and steerability of sparse-autoencoder features.

Sub-packages: ``stages`` (one module per Snakemake rule entry), ``sae`` (models, training, kernels,
measures), ``data`` (corpus, shards, loader, checkpoints), ``subject`` (the subject model),
``features`` (mining feature examples), ``judges`` (explainers, scorers, LLM client, embedding judge),
``stability`` (matching across seeds), ``stats`` (intervals, regressions), ``report`` (tables, plots,
summary) and ``runtime`` (logs, devices). ``layout`` (names and paths) and ``settings`` (typed
settings and enumerations) import no torch: the Snakefile builds the DAG from them alone.
"""

__version__ = "0.1.0"
