from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.digits_cache import cache_digits

with stage_log(snakemake.log[0], "digits_cache"):
    cache_digits(snakemake.params.settings, snakemake.output.manifest)
