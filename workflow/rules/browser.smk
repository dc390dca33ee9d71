# Feature browser: a static site under results/lm/browser/ (open index.html from disk). One records job per
# variant (mines the contexts of the features with a page and of their partners), then the site.
# Build it alone for an existing results folder: snakemake --cores 2 browser


BROWSER_SETTINGS = config.get("browser", {})


rule browser_condition:
    """Gather one variant's feature records: list columns, and for the features with a page their
    contexts, explanation, scores, steering examples and partners (with contexts) in every other seed."""
    input:
        manifest=LAYOUT.cache_manifest(LANGUAGE_MODEL),
        model=subject_model_input(),
        match_features=LAYOUT.match_file(LANGUAGE_MODEL, "{variant}", "features"),
        match_summary=LAYOUT.match_file(LANGUAGE_MODEL, "{variant}", "summary"),
        autointerp_scores=LAYOUT.autointerp_file("{variant}", config["autointerp"]["seed"], "scores"),
        steer_rows=LAYOUT.steer_file("{variant}", config["steer"]["seed"], "rows"),
        evaluate_latents=LAYOUT.evaluate_file("{variant}", config["evaluate"]["seed"], "latents"),
        sae_groups=lambda wildcards: EXPERIMENT.sae_group_dirs(LANGUAGE_MODEL, wildcards.variant),
    output:
        records=LAYOUT.browser_records("{variant}"),
    params:
        inputs=lambda wildcards: {**EXPERIMENT.browser_inputs(wildcards.variant), "variant": wildcards.variant},
        settings=BROWSER_SETTINGS,
        mining=config["autointerp"]["mining"],
        judges=config["steer"]["judges"],
    log:
        LAYOUT.log("browser_condition", "{variant}"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/browser_condition.py"


rule browser:
    """The static site: index.html (stability figures, feature list), feature.html and the data/ chunks."""
    input:
        records=[LAYOUT.browser_records(variant) for variant in EXPERIMENT.variants(LANGUAGE_MODEL)],
    output:
        index=report(LAYOUT.browser_file("index"), caption="../report/browser.rst", category="Feature browser"),
        feature_page=LAYOUT.browser_file("feature_page"),
        data=directory(LAYOUT.browser_file("data")),
    params:
        settings=BROWSER_SETTINGS,
    log:
        LAYOUT.log("browser"),
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/browser.py"


ALL_TARGETS.append(LAYOUT.browser_file("index"))
