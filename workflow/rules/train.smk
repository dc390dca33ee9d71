# SAE training: one job per (experiment, variant, seed group); the seeds of a group train together.


rule train:
    """Train the SAEs of one variant for one seed group, evaluate them on held-out cache rows
    (plus CE-loss recovered for the language model) and write seed<s>/ folders and curves.parquet."""
    input:
        manifest=LAYOUT.cache_manifest("{experiment}"),
        model=lambda wildcards: subject_model_input() if wildcards.experiment == LANGUAGE_MODEL else [],
    output:
        directory(LAYOUT.sae_group_dir("{experiment}", "{variant}", "{group}")),
    params:
        settings=lambda wildcards: EXPERIMENT.variant_settings(wildcards.experiment, wildcards.variant),
        seeds=lambda wildcards: EXPERIMENT.group_seeds(wildcards.experiment, wildcards.group),
        # resumable state; not an output, so Snakemake leaves it alone when a job is killed
        state_dir=lambda wildcards: LAYOUT.train_state_dir(wildcards.experiment, wildcards.variant, wildcards.group),
    log:
        LAYOUT.log("train", "{experiment}", "{variant}", "{group}"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/train.py"


ALL_TARGETS.extend(folder for variant in EXPERIMENT.variants(LANGUAGE_MODEL) for folder in EXPERIMENT.sae_group_dirs(LANGUAGE_MODEL, variant))
