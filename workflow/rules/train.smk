# SAE training: one job per (experiment, variant, seed group); the seeds of a group train together.

from sae_pipeline.train import group_seeds, variant_settings


rule train:
    """Train the SAEs of one variant for one seed group, evaluate them on held-out cache rows
    (plus CE-loss recovered for the language model) and write seed<s>/ folders and curves.parquet."""
    input:
        manifest=f"{RESULTS}/{{experiment}}/cache/manifest.json",
        model=lambda wildcards: subject_model_input() if wildcards.experiment == "lm" else [],
    output:
        directory(f"{RESULTS}/{{experiment}}/sae/{{variant}}/{{group}}"),
    params:
        settings=lambda wildcards: variant_settings(variants(wildcards.experiment), wildcards.variant),
        seeds=lambda wildcards: group_seeds(groups(wildcards.experiment), wildcards.group),
        # resumable state; not an output, so Snakemake leaves it alone when a job is killed
        state_dir=lambda wildcards: f"{RESULTS}/{wildcards.experiment}/.train_state/{wildcards.variant}/{wildcards.group}",
    log:
        f"{RESULTS}/logs/train/{{experiment}}/{{variant}}/{{group}}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    conda:
        "../envs/sae-stability.yaml"
    script:
        "../scripts/train.py"


ALL_TARGETS.extend(folder for variant in variants("lm") for folder in sae_group_dirs("lm", variant))
