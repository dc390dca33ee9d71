from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.cache import cache_activations

with stage_log(snakemake.log[0], "cache"), gpu_slot_for(snakemake):
    cache_activations(
        snakemake.params.model_ref,
        snakemake.params.hook_name,
        snakemake.params.corpus,
        snakemake.input.documents[0] if snakemake.input.documents else None,
        snakemake.output.manifest,
        snakemake.params.settings,
        model_dtype=snakemake.params.model_dtype,
    )
