from pathlib import Path

from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.train import train_saes

with stage_log(snakemake.log[0], "train"), gpu_slot_for(snakemake):
    train_saes(
        cache_dir=Path(snakemake.input.manifest).parent,
        output_dir=snakemake.output[0],
        settings=snakemake.params.settings,
        seeds=snakemake.params.seeds,
        state_dir=snakemake.params.state_dir,
        variant=snakemake.wildcards.variant,
        threads=snakemake.threads,
    )
