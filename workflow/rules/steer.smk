# Steering: for one seed's SAE per variant, steer sampled features along their unit decoder directions
# while the subject model generates, and judge the texts against the features' explanations.


rule steer:
    """Generate unsteered and steered continuations of the neutral prompts for sampled features and judge them."""
    input:
        model=subject_model_input(),
        manifest=LAYOUT.cache_manifest(LANGUAGE_MODEL),
        sae_group=lambda wildcards: EXPERIMENT.sae_group_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        scores=LAYOUT.autointerp_file("{variant}", "{seed}", "scores"),
        lm_model=lm_judge_inputs("lm" in config["steer"]["judges"]),
    output:
        rows=LAYOUT.steer_file("{variant}", "{seed}", "rows"),
        features=LAYOUT.steer_file("{variant}", "{seed}", "features"),
        controls=LAYOUT.steer_file("{variant}", "{seed}", "controls"),
    params:
        # only the active strength mode's settings, so that those of the other modes do not rerun the job
        settings=active_strength_settings(config["steer"]),
        sae=lambda wildcards: EXPERIMENT.sae_dir_of(LANGUAGE_MODEL, wildcards.variant, wildcards.seed),
        # the judge endpoint (autointerp.llm) only when the LLM judge is on, so that its settings do not
        # rerun an embedding-only steering job
        llm=config["autointerp"]["llm"] if "llm" in config["steer"]["judges"] else None,
        judge_cache_dir=autointerp_judge_cache_dir() if "llm" in config["steer"]["judges"] else None,
        lm_judge=config.get("lm_judge", {}) if "lm" in config["steer"]["judges"] else None,
        lm_model=lm_judge_model_param("lm" in config["steer"]["judges"]),
    log:
        LAYOUT.log("steer", "{variant}", "seed{seed}"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/steer.py"


ALL_TARGETS.extend(LAYOUT.steer_file(variant, config["steer"]["seed"], output) for variant in EXPERIMENT.variants(LANGUAGE_MODEL) for output in ("rows", "features"))
