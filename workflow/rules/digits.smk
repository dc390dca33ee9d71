# The digits stability experiment (claim 1): images cached as an activation cache; the generic train
# and match rules train and match the digits grid; this file adds the cache and the final table.

from sae_pipeline.layout import digits_cell


rule digits_cache:
    """Cache the digit images (scikit-learn's 8x8 digits offline, MNIST from the Hub if configured)
    in the activation-shard format, with their class labels."""
    output:
        manifest=LAYOUT.cache_manifest(DIGITS),
    params:
        settings=config["digits"]["data"],
    log:
        LAYOUT.log("digits_cache"),
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
        summaries=[LAYOUT.match_file(DIGITS, variant, "summary") for variant in EXPERIMENT.variants(DIGITS)],
        sae_groups=[folder for variant in EXPERIMENT.variants(DIGITS) for folder in EXPERIMENT.sae_group_dirs(DIGITS, variant)],
    output:
        table=LAYOUT.digits_file("table"),
        plot=report(LAYOUT.digits_file("plot"), caption="../report/digits_stability.rst", category="Claim 1: digits stability"),
        summary=LAYOUT.digits_file("summary"),
    params:
        summaries={variant: LAYOUT.match_file(DIGITS, variant, "summary") for variant in EXPERIMENT.variants(DIGITS)},
        cells={variant: digits_cell(settings) for variant, settings in EXPERIMENT.variants(DIGITS).items()},
        metrics_files={variant: EXPERIMENT.metrics_files(DIGITS, variant) for variant in EXPERIMENT.variants(DIGITS)},
    log:
        LAYOUT.log("digits_table"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/digits_table.py"


ALL_TARGETS.extend([rules.digits_table.output.table, rules.digits_table.output.plot, rules.digits_table.output.summary])
