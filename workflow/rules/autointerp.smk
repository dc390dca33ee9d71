# Autointerp: explain and score the features of one seed's SAE per variant (the seed steering uses).


rule autointerp:
    """Mine top/quantile/non-activating contexts of SAE features, explain them and score the explanations."""
    input:
        manifest=LAYOUT.cache_manifest(LANGUAGE_MODEL),
        sae_group=lambda wildcards: EXPERIMENT.sae_group_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        sharedness=LAYOUT.match_file(LANGUAGE_MODEL, "{variant}", "features"),
        partner_sae_groups=lambda wildcards: sorted({EXPERIMENT.sae_group_dir_of(LANGUAGE_MODEL, wildcards.variant, seed) for seed in config["autointerp"].get("partner_seeds", [])}),
        lm_model=lm_judge_inputs(config["autointerp"]["backend"] == "lm"),
    output:
        scores=LAYOUT.autointerp_file("{variant}", "{seed}", "scores"),
        audit=LAYOUT.autointerp_file("{variant}", "{seed}", "audit"),
        controls=LAYOUT.autointerp_file("{variant}", "{seed}", "controls"),
    params:
        settings=autointerp_settings(),
        sae=lambda wildcards: EXPERIMENT.sae_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        partner_sae_dirs=lambda wildcards: {seed: EXPERIMENT.sae_dir_of(LANGUAGE_MODEL, wildcards.variant, seed) for seed in config["autointerp"].get("partner_seeds", [])},
        judge_cache_dir=autointerp_judge_cache_dir() if config["autointerp"]["backend"] == "llm" else None,
        # the in-process judge's settings only when it is the backend, so they do not rerun other backends' jobs
        lm_judge=config.get("lm_judge", {}) if config["autointerp"]["backend"] == "lm" else None,
        lm_model=lm_judge_model_param(config["autointerp"]["backend"] == "lm"),
    log:
        LAYOUT.log("autointerp", "{variant}", "seed{seed}"),
    threads: config["autointerp"]["threads"]
    resources:
        gpu=0 if config["autointerp"]["mining"]["device"] == "cpu" else 1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/autointerp.py"


ALL_TARGETS.extend(LAYOUT.autointerp_file(variant, config["autointerp"]["seed"], "scores") for variant in EXPERIMENT.variants(LANGUAGE_MODEL))
