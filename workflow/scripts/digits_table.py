from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.digits_table import digits_stability_table

with stage_log(snakemake.log[0], "digits_table"):
    digits_stability_table(
        snakemake.params.summaries,
        snakemake.params.cells,
        snakemake.params.metrics_files,
        snakemake.input.manifest,
        snakemake.output.table,
        snakemake.output.plot,
        snakemake.output.summary,
    )
