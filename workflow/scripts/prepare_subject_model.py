from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.prepare_subject_model import prepare_subject_model

with stage_log(snakemake.log[0], "prepare_subject_model"):
    prepare_subject_model(snakemake.params.settings, snakemake.output.model)
