# Steering: for one seed's SAE per variant, steer sampled features along their unit decoder directions
# while the subject model generates, and judge the texts against the features' explanations.


def steer_llm_settings():
    """The judge endpoint (autointerp.llm) when the LLM judge is on, else None (so its settings do not
    rerun an embedding-only steering job)."""
    return config["autointerp"]["llm"] if "llm" in config["steer"]["judges"] else None


rule steer:
    """Generate unsteered and steered continuations of the neutral prompts for sampled features and judge them."""
    input:
        model=subject_model_input(),
        manifest=f"{RESULTS}/lm/cache/manifest.json",
        sae_group=lambda wildcards: f"{RESULTS}/lm/sae/{wildcards.variant}/{group_of('lm', wildcards.seed)}",
        scores=f"{RESULTS}/lm/autointerp/{{variant}}/seed{{seed}}/scores.parquet",
    output:
        rows=f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/rows.parquet",
        features=f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/features.csv",
    params:
        settings=config["steer"],
        sae=lambda wildcards: sae_dir("lm", wildcards.variant, wildcards.seed),
        llm=steer_llm_settings(),
        judge_cache_dir=autointerp_judge_cache_dir() if steer_llm_settings() is not None else None,
    log:
        f"{RESULTS}/logs/steer/{{variant}}/seed{{seed}}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/steer.py"


STEER_ROWS = expand(f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/rows.parquet", variant=list(variants("lm")), seed=config["steer"]["seed"])
STEER_FEATURES = expand(f"{RESULTS}/lm/steer/{{variant}}/seed{{seed}}/features.csv", variant=list(variants("lm")), seed=config["steer"]["seed"])
ALL_TARGETS.extend(STEER_ROWS + STEER_FEATURES)
