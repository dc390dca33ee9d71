from sae_pipeline.corpus import export_documents
from sae_pipeline.logs import stage_log

with stage_log(snakemake.log[0], "export_corpus"):
    export_documents(snakemake.params.corpus, snakemake.output.documents)
