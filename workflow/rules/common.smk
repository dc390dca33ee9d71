# Shared by every rule file: config validation, the variant grid, and path helpers.

import json

from snakemake.utils import validate

from sae_pipeline.config import expand_variants, seed_group_label, seed_groups


validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
# Every rule file appends the final targets of its stage here; `rule all` asks for all of them.
ALL_TARGETS = []


wildcard_constraints:
    experiment="lm|digits",
    variant="[A-Za-z0-9_.+-]+",
    group="seeds[0-9-]+",
    seed="[0-9]+",


def train_section(experiment):
    """The training settings of an experiment: `train` for the language model, `digits.train` for digits."""
    return config["train"] if experiment == "lm" else config["digits"]["train"]


def variants(experiment):
    """Ordered {variant name: settings} of an experiment's grid."""
    return expand_variants(train_section(experiment))


def groups(experiment):
    """Seed groups of an experiment (each group is one training job)."""
    section = train_section(experiment)
    return seed_groups(list(section["seeds"]), int(section["seeds_per_job"]))


def group_of(experiment, seed):
    """Label of the seed group that trains `seed`."""
    for group in groups(experiment):
        if int(seed) in group:
            return seed_group_label(group)
    raise ValueError(f"seed {seed} is not in {experiment} train.seeds")


def sae_group_dirs(experiment, variant):
    """Training output folders of a variant, one per seed group."""
    return [f"{RESULTS}/{experiment}/sae/{variant}/{seed_group_label(group)}" for group in groups(experiment)]


def sae_dir(experiment, variant, seed):
    """Folder of one trained SAE (cfg.json + sae_weights.safetensors)."""
    return f"{RESULTS}/{experiment}/sae/{variant}/{group_of(experiment, seed)}/seed{seed}"


def as_json(value):
    """Params are passed to scripts as canonical JSON so a changed setting changes the params string."""
    return json.dumps(value, sort_keys=True)


def subject_model_ref():
    """What `load_subject_model` is given: the locally trained folder, or the configured Hub id/folder."""
    if config["subject_model"]["source"] == "train_local":
        return f"{RESULTS}/lm/subject_model"
    return config["subject_model"]["pretrained_name"]


def subject_model_input():
    """Rule input that makes a stage wait for the locally trained subject model (nothing for a Hub model)."""
    if config["subject_model"]["source"] == "train_local":
        return [f"{RESULTS}/lm/subject_model"]
    return []
