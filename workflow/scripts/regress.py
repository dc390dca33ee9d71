from sae_pipeline.logs import stage_log
from sae_pipeline.regress import run_regression

with stage_log(snakemake.log[0], "regress"):
    run_regression(snakemake.params.layout, dict(snakemake.output.items()), snakemake.params.settings)
