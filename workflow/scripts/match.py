from pathlib import Path

from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.match import run_match

with stage_log(snakemake.log[0], "match"), gpu_slot_for(snakemake):
    run_match(snakemake.params.sae_dirs, Path(snakemake.output.summary).parent, snakemake.params.settings, title=snakemake.params.title)
