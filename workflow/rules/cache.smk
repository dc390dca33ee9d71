# Activation caching: subject model over the corpus -> Parquet shards + manifest.


rule cache:
    """Cache the configured hook's activations (plus doc id, position, token id, BOS flag) as Parquet shards."""
    input:
        documents=corpus_documents_input(),
        model=subject_model_input(),
    output:
        manifest=LAYOUT.cache_manifest(LANGUAGE_MODEL),
    params:
        model_ref=lambda wildcards, input: input.model[0] if input.model else subject_model_ref(),
        hook_name=config["subject_model"]["hook_name"],
        model_dtype=config["subject_model"].get("dtype", "auto"),
        corpus=config["corpus"],
        settings=config["cache"],
    log:
        LAYOUT.log("cache"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/cache.py"


ALL_TARGETS.append(rules.cache.output.manifest)
