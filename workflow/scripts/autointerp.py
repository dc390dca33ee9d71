import os

from sae_pipeline.runtime.gpu_slots import gpu_slot_for
from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.autointerp import run_autointerp

with stage_log(snakemake.log[0], "autointerp"), gpu_slot_for(snakemake):
    run_autointerp(
        os.path.dirname(snakemake.input.manifest),
        snakemake.params.sae,
        snakemake.input.sharedness,
        snakemake.output.scores,
        snakemake.output.audit,
        snakemake.params.settings,
        judge_cache_dir=snakemake.params.judge_cache_dir,
        threads=snakemake.threads,
        controls_path=snakemake.output.controls,
        lm_judge=snakemake.params.lm_judge,
        lm_model=snakemake.params.lm_model,
        partner_sae_dirs=snakemake.params.partner_sae_dirs,
    )
