import os

from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.browser import run_browser_condition

with stage_log(snakemake.log[0], "browser_condition"):
    run_browser_condition(
        snakemake.params.inputs,
        os.path.dirname(snakemake.input.manifest),
        snakemake.output.records,
        snakemake.params.settings,
        snakemake.params.mining,
        snakemake.params.judges,
    )
