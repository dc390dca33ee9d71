from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.subject_model import train_subject_model

with stage_log(snakemake.log[0], "train_subject_model"):
    train_subject_model(snakemake.input.documents[0], snakemake.params.corpus, snakemake.output.model, snakemake.params.settings)
