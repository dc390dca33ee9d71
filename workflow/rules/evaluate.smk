# Evaluate stage (claim 4): one job per variant and evaluated seed (`evaluate.seed`, plus `evaluate.seeds`).

EVALUATE_SEEDS = EXPERIMENT.evaluate_seeds()
# The job's params: the section less `seeds` (which seeds are evaluated does not change a seed's outputs).
EVALUATE_SETTINGS = {key: value for key, value in config["evaluate"].items() if key != "seeds"}


rule evaluate:
    """k-robustness (FVU, CE-loss recovered at k' = multiplier x k), code concentration, latent usage,
    monosemanticity proxies and sparse probing of one trained SAE."""
    input:
        sae_group=lambda wildcards: EXPERIMENT.sae_group_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        cache=LAYOUT.cache_manifest(LANGUAGE_MODEL),
        model=subject_model_input(),
    output:
        metrics=LAYOUT.evaluate_file("{variant}", "{seed}", "metrics"),
        k_robustness=LAYOUT.evaluate_file("{variant}", "{seed}", "k_robustness"),
        probing=LAYOUT.evaluate_file("{variant}", "{seed}", "probing"),
        latents=LAYOUT.evaluate_file("{variant}", "{seed}", "latents"),
        frequency_plot=report(
            LAYOUT.evaluate_file("{variant}", "{seed}", "frequency_plot"),
            caption="../report/latent_frequency.rst",
            category="Claim 4: Top-k regularizers",
            subcategory="Latent usage",
            labels={"variant": "{variant}", "seed": "{seed}"},
        ),
    params:
        settings=EVALUATE_SETTINGS,
        sae=lambda wildcards: EXPERIMENT.sae_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        condition=lambda wildcards: EXPERIMENT.condition(wildcards.variant).label,
    log:
        LAYOUT.log("evaluate", "{variant}-seed{seed}"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/evaluate.py"


ALL_TARGETS.extend(LAYOUT.evaluate_file(variant, seed, "metrics") for variant in EXPERIMENT.variants(LANGUAGE_MODEL) for seed in EVALUATE_SEEDS)
