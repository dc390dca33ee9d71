from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.judge_accuracy import measure_judge_accuracy

with stage_log(snakemake.log[0], "judge_accuracy"):
    measure_judge_accuracy(
        snakemake.output.accuracy,
        snakemake.params.judges,
        snakemake.params.embedding_threshold,
        lm_judge=snakemake.params.lm_judge,
        lm_model=snakemake.params.lm_model,
    )
