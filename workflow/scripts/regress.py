from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.regress import run_regression

with stage_log(snakemake.log[0], "regress"):
    run_regression(
        snakemake.params.layout,
        dict(snakemake.output.items()),
        snakemake.params.settings,
        digits_inputs=snakemake.params.digits_layout,
        digits_summary=snakemake.input.digits_summary[0] if snakemake.input.digits_summary else None,
        judge_accuracy=snakemake.input.judge_accuracy,
        claim4_markdown=snakemake.input.claim4_markdown[0] if snakemake.input.claim4_markdown else None,
    )
