from sae_pipeline.runtime.logs import stage_log
from sae_pipeline.stages.export_corpus import export_documents

with stage_log(snakemake.log[0], "export_corpus"):
    export_documents(snakemake.params.corpus, snakemake.output.documents)
