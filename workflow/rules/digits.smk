# The digits stability experiment (claim 1): images cached as an activation cache; the generic train
# and match rules train and match the digits grid; this file adds the cache and the final table.

from sae_pipeline.digits import cell_of


rule digits_cache:
    """Cache the digit images (scikit-learn's 8x8 digits offline, MNIST from the Hub if configured)
    in the activation-shard format, with their class labels."""
    output:
        manifest=f"{RESULTS}/digits/cache/manifest.json",
    params:
        settings=config["digits"]["data"],
    log:
        f"{RESULTS}/logs/digits_cache.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/digits_cache.py"


rule digits_table:
    """Shared fraction, MMCS and training quality per digits grid cell; claim 1's direction."""
    input:
        manifest=rules.digits_cache.output.manifest,
        summaries=expand(f"{RESULTS}/digits/match/{{variant}}/summary.json", variant=list(variants("digits"))),
        sae_groups=[folder for variant in variants("digits") for folder in sae_group_dirs("digits", variant)],
    output:
        table=f"{RESULTS}/digits/stability_table.csv",
        plot=report(f"{RESULTS}/digits/stability.png", caption="../report/digits_stability.rst", category="Claim 1: digits stability"),
        summary=f"{RESULTS}/digits/stability_summary.json",
    params:
        cells={variant: cell_of(settings) for variant, settings in variants("digits").items()},
        sae_dirs={variant: [sae_dir("digits", variant, seed) for seed in config["digits"]["train"]["seeds"]] for variant in variants("digits")},
    log:
        f"{RESULTS}/logs/digits_table.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/digits_table.py"


ALL_TARGETS.extend([rules.digits_table.output.table, rules.digits_table.output.plot, rules.digits_table.output.summary])
