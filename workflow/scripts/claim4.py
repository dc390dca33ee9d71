from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.claim4 import run_claim4

with stage_log(snakemake.log[0], "claim4"):
    run_claim4(
        snakemake.params.layout,
        {name: path for name, path in snakemake.output.items() if name != "plots"},
        snakemake.params.plots,
        budgets=snakemake.params.budgets,
    )
