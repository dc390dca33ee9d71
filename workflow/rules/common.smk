# Shared by all rule files -- config validation and the experiment's layout (names and paths from
# sae_pipeline.layout, which imports no torch, so building the DAG stays fast).

from snakemake.utils import validate

from sae_pipeline.layout import CLAIM4_PLOTS as CLAIM4_PLOT_NAMES, DIGITS, LANGUAGE_MODEL, Experiment, input_files
from sae_pipeline.settings import active_strength_settings


validate(config, "../schemas/config.schema.yaml")

EXPERIMENT = Experiment(config)
EXPERIMENT.check_settings()
LAYOUT = EXPERIMENT.layout
RESULTS = LAYOUT.root
# Every rule file appends the final targets of its stage here; `rule all` asks for all of them.
ALL_TARGETS = []


# Subject-model sources that write a local folder (prepared from a GGUF, or trained here).
LOCAL_SUBJECT_MODEL = ("gguf", "train_local")


def subject_model_ref():
    """What `load_subject_model` is given: the local folder, or the configured Hub id/folder."""
    if config["subject_model"]["source"] in LOCAL_SUBJECT_MODEL:
        return LAYOUT.subject_model()
    return config["subject_model"]["pretrained_name"]


def subject_model_input():
    """Rule input that makes a stage wait for the local subject-model folder (nothing for a Hub model)."""
    if config["subject_model"]["source"] in LOCAL_SUBJECT_MODEL:
        return [LAYOUT.subject_model()]
    return []


def corpus_documents_input():
    """The exported documents file for a local corpus; nothing for a Hub dataset (streamed directly)."""
    if config["corpus"]["source"] == "hf_dataset":
        return []
    return [LAYOUT.corpus_documents()]


def lm_judge_model_ref():
    """The in-process judge's model: lm_judge.model, else the subject model."""
    return config.get("lm_judge", {}).get("model") or subject_model_ref()


def lm_judge_inputs(used):
    """Rule input for the in-process judge's model (the local subject-model folder) when the judge is used."""
    if not used or config.get("lm_judge", {}).get("model"):
        return []
    return subject_model_input()


def measured_judges():
    """The judges whose accuracy the run measures: the embedding and lm judges it uses anywhere."""
    used = set(config["steer"]["judges"]) | ({"lm"} if config["autointerp"]["backend"] == "lm" else set())
    return sorted(used & {"embedding", "lm"})


def lm_judge_model_param(used):
    """Rule param: the in-process judge's model (the input folder when it is one), or None when not used."""
    if not used:
        return None
    return lambda wildcards, input: input.lm_model[0] if input.lm_model else lm_judge_model_ref()


def autointerp_settings():
    """The autointerp section with only the active backend's subsection, so that settings of the unused
    backend (e.g. the judge endpoint while the offline baseline runs) do not rerun the job."""
    section = dict(config["autointerp"])
    section.pop("offline" if section["backend"] == "llm" else "llm")
    return section


def autointerp_judge_cache_dir():
    """The LLM judge's response cache folder (``{results_dir}`` in the setting is replaced)."""
    return LAYOUT.judge_cache(config["autointerp"]["llm"]["cache_dir"])


# Regress outputs that the Snakemake report shows: caption file and category.
REPORT_ITEMS = {
    "coefficients": ("coefficients.rst", "Claim 3: interp score predicts steering"),
    "summary_html": ("summary.rst", "Summary"),
    "plot_shared_fraction": ("shared_fraction.rst", "Claim 2: stability and steering"),
    "plot_steering_success": ("steering_success.rst", "Claim 2: stability and steering"),
    "plot_success_vs_interp": ("success_vs_interp.rst", "Claim 3: interp score predicts steering"),
    "plot_training_curves": ("training_curves.rst", "Training"),
    "plot_k_robustness": ("k_robustness.rst", "Claim 4: Top-k regularizers"),
    "plot_probing": ("probing.rst", "Claim 4: Top-k regularizers"),
    "plot_reappearance": ("reappearance.rst", "Stability across seeds"),
}


def regress_output(name):
    """A regress output path, wrapped for the report when it is a report item."""
    path = LAYOUT.regress_file(name)
    if name in REPORT_ITEMS:
        caption, category = REPORT_ITEMS[name]
        return report(path, caption=f"../report/{caption}", category=category)
    return path
