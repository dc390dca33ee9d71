# Autointerp: explain and score the features of one seed's SAE per variant (the seed steering uses).


rule autointerp:
    """Mine top/quantile/non-activating contexts of SAE features, explain them and score the explanations."""
    input:
        manifest=f"{RESULTS}/lm/cache/manifest.json",
        sae_group=lambda wildcards: sae_group_dir("lm", wildcards.variant, wildcards.seed),
        sharedness=f"{RESULTS}/lm/match/{{variant}}/features.parquet",
    output:
        scores=f"{RESULTS}/lm/autointerp/{{variant}}/seed{{seed}}/scores.parquet",
        audit=f"{RESULTS}/lm/autointerp/{{variant}}/seed{{seed}}/audit.jsonl",
    params:
        settings=autointerp_settings(),
        sae=lambda wildcards: sae_dir("lm", wildcards.variant, wildcards.seed),
        judge_cache_dir=autointerp_judge_cache_dir() if config["autointerp"]["backend"] == "llm" else None,
    log:
        f"{RESULTS}/logs/autointerp/{{variant}}/seed{{seed}}.log",
    threads: config["autointerp"]["threads"]
    resources:
        gpu=0 if config["autointerp"]["mining"]["device"] == "cpu" else 1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/autointerp.py"


ALL_TARGETS.extend(
    expand(
        f"{RESULTS}/lm/autointerp/{{variant}}/seed{{seed}}/scores.parquet",
        variant=list(variants("lm")),
        seed=config["autointerp"]["seed"],
    )
)
