from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.browser import run_browser

with stage_log(snakemake.log[0], "browser"):
    run_browser(snakemake.input.records, snakemake.output.index, snakemake.params.settings)
