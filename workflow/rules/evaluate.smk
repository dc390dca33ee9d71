# Evaluate stage (claim 4): one job per variant, on the SAE of seed `evaluate.seed`.

from sae_pipeline.config import condition_label


rule evaluate:
    """k-robustness (FVU, CE-loss recovered at k' = multiplier x k), code concentration, latent usage,
    monosemanticity proxies and sparse probing of one trained SAE."""
    input:
        sae_group=lambda wildcards: sae_group_dir("lm", wildcards.variant, wildcards.seed),
        cache=f"{RESULTS}/lm/cache/manifest.json",
        model=subject_model_input(),
    output:
        metrics=f"{RESULTS}/lm/evaluate/{{variant}}/seed{{seed}}/metrics.json",
        k_robustness=f"{RESULTS}/lm/evaluate/{{variant}}/seed{{seed}}/k_robustness.csv",
        probing=f"{RESULTS}/lm/evaluate/{{variant}}/seed{{seed}}/probing.csv",
        latents=f"{RESULTS}/lm/evaluate/{{variant}}/seed{{seed}}/latents.parquet",
        frequency_plot=report(
            f"{RESULTS}/lm/evaluate/{{variant}}/seed{{seed}}/latent_frequency.png",
            caption="../report/latent_frequency.rst",
            category="Claim 4: Top-k regularizers",
            subcategory="Latent usage",
            labels={"variant": "{variant}", "seed": "{seed}"},
        ),
    params:
        settings=config["evaluate"],
        sae=lambda wildcards: sae_dir("lm", wildcards.variant, wildcards.seed),
        condition=lambda wildcards: condition_label(variants("lm")[wildcards.variant]),
    log:
        f"{RESULTS}/logs/evaluate/{{variant}}-seed{{seed}}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/evaluate.py"


ALL_TARGETS.extend(expand(rules.evaluate.output.metrics, variant=list(variants("lm")), seed=config["evaluate"]["seed"]))
