# Steering: for one seed's SAE per variant, steer sampled features along their unit decoder directions
# while the subject model generates, and judge the texts against the features' explanations.


rule steer:
    """Generate unsteered and steered continuations of the neutral prompts for sampled features and judge them."""
    input:
        model=subject_model_input(),
        manifest=f"{RESULTS}/lm/cache/manifest.json",
        sae_group=lambda wildcards: sae_group_dir("lm", wildcards.variant, wildcards.seed),
        scores=f"{RESULTS}/lm/autointerp/{{variant}}/seed{{seed}}/scores.parquet",
    output:
        rows=f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/rows.parquet",
        features=f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/features.csv",
    params:
        settings=config["steer"],
        sae=lambda wildcards: sae_dir("lm", wildcards.variant, wildcards.seed),
        # the judge endpoint (autointerp.llm) only when the LLM judge is on, so that its settings do not
        # rerun an embedding-only steering job
        llm=config["autointerp"]["llm"] if "llm" in config["steer"]["judges"] else None,
        judge_cache_dir=autointerp_judge_cache_dir() if "llm" in config["steer"]["judges"] else None,
    log:
        f"{RESULTS}/logs/steer/{{variant}}/seed{{seed}}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/steer.py"


ALL_TARGETS.extend(expand(list(rules.steer.output), variant=list(variants("lm")), seed=config["steer"]["seed"]))
