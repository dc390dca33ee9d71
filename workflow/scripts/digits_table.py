from pathlib import Path

from sae_pipeline.digits import digits_stability_table
from sae_pipeline.logs import stage_log

with stage_log(snakemake.log[0], "digits_table"):
    digits_stability_table(
        {Path(path).parent.name: path for path in snakemake.input.summaries},
        snakemake.params.cells,
        snakemake.params.sae_dirs,
        snakemake.input.manifest,
        snakemake.output.table,
        snakemake.output.plot,
        snakemake.output.summary,
    )
