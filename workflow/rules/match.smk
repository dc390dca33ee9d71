# Feature matching across seeds: one job per (experiment, variant) over all of its seeds.


rule match:
    """MMCS, fraction paired and decoder+encoder Hungarian sharing for every seed pair of one variant;
    per-feature share_count and category of the reference seed; histogram of max cosines."""
    input:
        lambda wildcards: sae_group_dirs(wildcards.experiment, wildcards.variant),
    output:
        pairs=f"{RESULTS}/{{experiment}}/match/{{variant}}/pairs.csv",
        features=f"{RESULTS}/{{experiment}}/match/{{variant}}/features.parquet",
        summary=f"{RESULTS}/{{experiment}}/match/{{variant}}/summary.json",
        histogram=report(
            f"{RESULTS}/{{experiment}}/match/{{variant}}/max_cosine_hist.png",
            caption="../report/max_cosine_hist.rst",
            category="Feature matching",
            labels={"experiment": "{experiment}", "variant": "{variant}"},
        ),
    params:
        sae_dirs=lambda wildcards: [sae_dir(wildcards.experiment, wildcards.variant, seed) for seed in train_section(wildcards.experiment)["seeds"]],
        settings=config["match"],
        title=lambda wildcards: f"{wildcards.experiment}/{wildcards.variant}",
    log:
        f"{RESULTS}/logs/match/{{experiment}}/{{variant}}.log",
    threads: 2
    resources:
        gpu=lambda wildcards: 1 if wildcards.experiment == "lm" else 0,
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/match.py"


ALL_TARGETS.extend(expand(rules.match.output.summary, experiment="lm", variant=list(variants("lm"))))
