from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.steer import run_steering

with stage_log(snakemake.log[0], "steer"), gpu_slot_for(snakemake):
    run_steering(
        snakemake.input.manifest,
        snakemake.params.sae,
        snakemake.input.scores,
        snakemake.output.rows,
        snakemake.output.features,
        snakemake.params.settings,
        llm_settings=snakemake.params.llm,
        llm_cache_dir=snakemake.params.judge_cache_dir,
        controls_path=snakemake.output.controls,
        lm_judge=snakemake.params.lm_judge,
        lm_model=snakemake.params.lm_model,
    )
