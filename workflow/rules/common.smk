# Shared by every rule file -- config validation, the variant grid, path and input helpers.

from snakemake.utils import validate

from sae_pipeline.config import expand_variants, seed_group_label, seed_groups


validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
# Every rule file appends the final targets of its stage here; `rule all` asks for all of them.
ALL_TARGETS = []


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


def sae_group_dir(experiment, variant, seed):
    """Training output folder (one train job) that holds the SAE of `seed`."""
    return f"{RESULTS}/{experiment}/sae/{variant}/{group_of(experiment, seed)}"


def sae_dir(experiment, variant, seed):
    """Folder of one trained SAE (cfg.json + sae_weights.safetensors)."""
    return f"{sae_group_dir(experiment, variant, seed)}/seed{seed}"


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


def corpus_documents_input():
    """The exported documents file for a local corpus; nothing for a Hub dataset (streamed directly)."""
    if config["corpus"]["source"] == "hf_dataset":
        return []
    return [f"{RESULTS}/lm/corpus/documents.jsonl"]


def autointerp_settings():
    """The autointerp section with only the active backend's subsection, so that settings of the unused
    backend (e.g. the judge endpoint while the offline baseline runs) do not rerun the job."""
    section = dict(config["autointerp"])
    section.pop("offline" if section["backend"] == "llm" else "llm")
    return section


def autointerp_judge_cache_dir():
    """The LLM judge's response cache folder (``{results_dir}`` in the setting is replaced)."""
    return config["autointerp"]["llm"]["cache_dir"].format(results_dir=RESULTS)
