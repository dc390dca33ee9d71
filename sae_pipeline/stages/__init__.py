"""One module per Snakemake rule entry. Stages meet only through their files: no module here imports
another one here (tests/test_architecture.py checks it)."""
