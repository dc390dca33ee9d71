from sae_pipeline.digits import cache_digits
from sae_pipeline.logs import stage_log

with stage_log(snakemake.log[0], "digits_cache"):
    cache_digits(snakemake.params.settings, snakemake.output.manifest)
