# Feature matching across seeds: one job per (experiment, variant) over all of its seeds.


rule match:
    """MMCS, fraction paired and decoder+encoder Hungarian sharing for every seed pair of one variant;
    per-feature share_count, category and reappearance of the reference seed; histogram of max cosines;
    PW-MCC, the threshold curve, non-shared subspace overlap and seed-resampled intervals."""
    input:
        lambda wildcards: EXPERIMENT.sae_group_dirs(wildcards.experiment, wildcards.variant),
    output:
        pairs=LAYOUT.match_file("{experiment}", "{variant}", "pairs"),
        features=LAYOUT.match_file("{experiment}", "{variant}", "features"),
        summary=LAYOUT.match_file("{experiment}", "{variant}", "summary"),
        histogram=report(
            LAYOUT.match_file("{experiment}", "{variant}", "histogram"),
            caption="../report/max_cosine_hist.rst",
            category="Feature matching",
            labels={"experiment": "{experiment}", "variant": "{variant}"},
        ),
        threshold_curve=LAYOUT.match_file("{experiment}", "{variant}", "threshold_curve"),
        threshold_plot=report(
            LAYOUT.match_file("{experiment}", "{variant}", "threshold_plot"),
            caption="../report/threshold_curve.rst",
            category="Feature matching",
            labels={"experiment": "{experiment}", "variant": "{variant}"},
        ),
    params:
        sae_dirs=lambda wildcards: EXPERIMENT.sae_dirs(wildcards.experiment, wildcards.variant),
        settings=config["match"],
        title=lambda wildcards: f"{wildcards.experiment}/{wildcards.variant}",
    log:
        LAYOUT.log("match", "{experiment}", "{variant}"),
    threads: 2
    resources:
        gpu=lambda wildcards: 1 if wildcards.experiment == LANGUAGE_MODEL else 0,
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/match.py"


ALL_TARGETS.extend(LAYOUT.match_file(LANGUAGE_MODEL, variant, "summary") for variant in EXPERIMENT.variants(LANGUAGE_MODEL))
