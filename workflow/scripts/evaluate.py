from pathlib import Path

from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.evaluate import run_evaluation

with stage_log(snakemake.log[0], "evaluate"), gpu_slot_for(snakemake):
    run_evaluation(
        snakemake.params.sae,
        str(Path(snakemake.input.cache).parent),
        dict(snakemake.output.items()),
        snakemake.params.settings,
        variant=snakemake.wildcards.variant,
        seed=int(snakemake.wildcards.seed),
        condition=snakemake.params.condition,
    )
