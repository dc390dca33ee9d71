"""The experiment's layout: what variants, conditions and seed groups are called, and where every
stage's outputs live. Imports no torch (the Snakefile builds the DAG from this module alone).

Names are built from settings here and parsed back here, and nowhere else:

- a **variant** is one combination of the training grid; its name spells the grid values in a fixed
  axis order (:data:`AXIS_ORDER`), e.g. ``topk-k16-l2w1e-03-noreg``;
- a **condition** is a variant's regularization (weight penalty + sparsity regularizer), the factor
  the regress stage compares, e.g. ``l2w1e-03+noreg``; :class:`Condition` turns settings into a label
  and a label back into settings, so "is this the reference condition" is a property, not a regex;
- a **seed group** is the seeds one training job trains together, e.g. ``seeds0-1-2``.

:class:`ResultsLayout` gives every stage's output paths under ``results_dir`` (the rules and the
stages both take paths from it; a path may carry ``{wildcard}`` placeholders, which pass through),
and :class:`Experiment` binds a config to it: the variants, groups and per-stage inputs of a run.

Longer than 500 lines because it is the one place that names and places every output of every stage:
splitting it would put the names of one path in two modules, which is what this module exists to prevent.

Folder tree (``{exp}`` is ``lm`` or ``digits``)::

    lm/corpus/documents.jsonl                 lm/subject_model/
    {exp}/cache/manifest.json                 {exp}/sae/<variant>/<group>/seed<s>/, curves.parquet
    {exp}/match/<variant>/                    lm/{autointerp,steer,evaluate}/<variant>/seed<s>/
    lm/regress/                               digits/stability_table.csv, stability.png, ...
    lm/browser/index.html, feature.html, data/, records/<variant>.json
    logs/<rule>/...
"""

from __future__ import annotations

import copy
import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sae_pipeline.settings import PENALTY_KINDS, REGULARIZER_KINDS, EvaluateSettings, SubjectModelSettings, TrainSettings

LANGUAGE_MODEL = "lm"
DIGITS = "digits"
EXPERIMENTS = (LANGUAGE_MODEL, DIGITS)

# Grid axes in the order their values appear in a variant name; axes not listed follow, sorted.
# Names and their order therefore do not depend on the order in which config keys were merged.
AXIS_ORDER = (
    "architecture", "k", "d_sae", "weight_penalty", "weight_penalty_on", "regularizer", "lr",
    "tied_init", "unit_norm_decoder", "b_dec_init", "l1_coefficient", "aux_k_coefficient",
)
_BOOLEAN_ABBREVIATIONS = {"tied_init": "tied", "unit_norm_decoder": "unit"}

# What each stage writes (file names inside its folder).
SAE_CURVES = "curves.parquet"
SAE_METRICS = "metrics.json"
MATCH_OUTPUTS = {
    "pairs": "pairs.csv", "features": "features.parquet", "summary": "summary.json", "histogram": "max_cosine_hist.png",
    "threshold_curve": "threshold_curve.csv", "threshold_plot": "threshold_curve.png",
}
AUTOINTERP_OUTPUTS = {"scores": "scores.parquet", "audit": "audit.jsonl", "controls": "controls.parquet"}
STEER_OUTPUTS = {"rows": "rows.parquet", "features": "features.csv", "controls": "controls.parquet"}
EVALUATE_OUTPUTS = {
    "metrics": "metrics.json", "k_robustness": "k_robustness.csv", "probing": "probing.csv",
    "latents": "latents.parquet", "frequency_plot": "latent_frequency.png",
}
REGRESS_OUTPUTS = {
    "coefficients": "coefficients.csv", "summary": "summary.md", "summary_html": "summary.html",
    "steering_success": "steering_success.csv", "shared_fraction": "shared_fraction.csv", "autointerp": "autointerp.csv",
    "claim4": "claim4.csv", "k_robustness": "k_robustness.csv",
    "plot_shared_fraction": "plots/shared_fraction.png", "plot_steering_success": "plots/steering_success.png",
    "plot_success_vs_interp": "plots/success_vs_interp.png", "plot_training_curves": "plots/training_curves.png",
    "plot_k_robustness": "plots/k_robustness.png", "plot_probing": "plots/probing.png",
    "plot_reappearance": "plots/reappearance.png", "reappearance": "reappearance.parquet",
}
CLAIM4_OUTPUTS = {
    "table": "table.csv", "seeds": "seeds.csv", "k_robustness": "k_robustness.csv", "probing": "probing.csv",
    "summary": "claim4_summary.json", "markdown": "claim4.md",
}
# The claim-4 stage's figures, one of each per swept regularizer: plots/<plot>_<regularizer>.png.
CLAIM4_PLOTS = ("tradeoff", "k_robustness", "probing")
JUDGE_OUTPUTS = {"accuracy": "accuracy.csv"}
BROWSER_OUTPUTS = {"index": "index.html", "feature_page": "feature.html", "data": "data"}
DIGITS_OUTPUTS = {"table": "stability_table.csv", "plot": "stability.png", "summary": "stability_summary.json"}


# ----------------------------------------------------------------------------------------------
# Names


def format_coefficient(value: float) -> str:
    """A compact, filesystem-safe rendering of a coefficient: ``0`` -> ``"0"``, ``1e-4`` -> ``"1e-04"``."""
    value = float(value)
    if value == 0:
        return "0"
    text = f"{value:.0e}" if float(f"{value:.0e}") == value else f"{value:.3g}"
    return text.replace("+", "")


def _penalty_part(penalty: Mapping[str, Any]) -> str:
    kind = penalty["kind"]
    if kind == "none":
        return "nopen"
    return f"{kind}w{format_coefficient(penalty.get('coefficient', 0))}"


def _regularizer_part(regularizer: Mapping[str, Any]) -> str:
    if regularizer["kind"] == "none":
        return "noreg"
    return f"{regularizer['kind']}{format_coefficient(regularizer.get('coefficient', 0))}"


def _name_part(axis: str, value: Any) -> str:
    if axis == "architecture":
        return str(value)
    if axis == "k":
        return f"k{value}"
    if axis == "weight_penalty":
        return _penalty_part(value)
    if axis == "regularizer":
        return _regularizer_part(value)
    if isinstance(value, bool):
        return f"{_BOOLEAN_ABBREVIATIONS.get(axis, axis)}{int(value)}"
    return f"{axis}{value}"


def canonical_axes(axes: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """``axes`` reordered: the axes of :data:`AXIS_ORDER` in that order, then the others sorted by name."""
    known = [axis for axis in AXIS_ORDER if axis in axes]
    others = sorted(axis for axis in axes if axis not in AXIS_ORDER)
    return OrderedDict((axis, axes[axis]) for axis in known + others)


def variant_name(axes: Mapping[str, Any]) -> str:
    """Name of a variant from its grid-axis values, e.g. ``topk-k16-l2w1e-04-noreg`` (canonical axis order)."""
    return "-".join(_name_part(axis, value) for axis, value in canonical_axes(axes).items())


@dataclass(frozen=True)
class Condition:
    """A variant's regularization condition: weight penalty and Top-k sparsity regularizer.

    ``label`` is ``<penalty>+<regularizer>``: the penalty ``nopen`` or ``<kind>w<coefficient>``
    (``l2w0``, ``l2w1e-03``), the regularizer ``noreg`` or ``<kind><coefficient>``
    (``off_support_l11e-03``). :meth:`parse` inverts it.
    """

    penalty_kind: str = "none"
    penalty_coefficient: float = 0.0
    regularizer_kind: str = "none"
    regularizer_coefficient: float = 0.0

    @classmethod
    def of_settings(cls, settings: Mapping[str, Any]) -> "Condition":
        """The condition of a variant's training settings (missing entries: no penalty, no regularizer)."""
        penalty = dict(settings.get("weight_penalty") or {"kind": "none"})
        regularizer = dict(settings.get("regularizer") or {"kind": "none"})
        return cls(str(penalty["kind"]), float(penalty.get("coefficient", 0.0)), str(regularizer["kind"]), float(regularizer.get("coefficient", 0.0)))

    @property
    def label(self) -> str:
        penalty = _penalty_part({"kind": self.penalty_kind, "coefficient": self.penalty_coefficient})
        regularizer = _regularizer_part({"kind": self.regularizer_kind, "coefficient": self.regularizer_coefficient})
        return f"{penalty}+{regularizer}"

    @classmethod
    def parse(cls, label: str) -> "Condition":
        """The condition a :attr:`label` names; ``ValueError`` for anything else."""
        penalty, separator, regularizer = label.partition("+")
        if not separator:
            raise ValueError(f"not a condition label: {label!r} (expected <penalty>+<regularizer>, e.g. l2w0+noreg)")
        if penalty == "nopen":
            penalty_kind, penalty_coefficient = "none", 0.0
        else:
            found = re.fullmatch(r"([a-z0-9]+)w(.+)", penalty)
            if not found or found.group(1) not in PENALTY_KINDS:
                raise ValueError(f"condition {label!r}: {penalty!r} is not a weight penalty (nopen or <{'|'.join(PENALTY_KINDS[1:])}>w<coefficient>)")
            penalty_kind, penalty_coefficient = found.group(1), _parse_coefficient(found.group(2), label)
        if regularizer == "noreg":
            regularizer_kind, regularizer_coefficient = "none", 0.0
        else:
            kinds = sorted((kind for kind in REGULARIZER_KINDS if kind != "none" and regularizer.startswith(kind)), key=len, reverse=True)
            if not kinds:
                raise ValueError(f"condition {label!r}: {regularizer!r} is not a regularizer (noreg or <kind><coefficient>)")
            regularizer_kind = kinds[0]
            regularizer_coefficient = _parse_coefficient(regularizer[len(regularizer_kind):], label)
        return cls(penalty_kind, penalty_coefficient, regularizer_kind, regularizer_coefficient)

    @property
    def is_unregularized(self) -> bool:
        """No weight penalty in effect (none, or a zero coefficient) and no sparsity regularizer."""
        return self.penalty_coefficient == 0 and self.regularizer_kind == "none"


def _parse_coefficient(text: str, label: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"condition {label!r}: {text!r} is not a coefficient") from None


def reference_condition(labels: Sequence[str], requested: str | None = None) -> str:
    """The condition other conditions are contrasted against: ``requested`` if given (it must be one of
    ``labels``), else the first unregularized one in sorted order, else the first label in sorted order."""
    labels = sorted(set(labels))
    if requested:
        if requested not in labels:
            raise ValueError(f"regress.reference_condition {requested!r} is not among the conditions {labels}")
        return requested
    plain = [label for label in labels if _names_unregularized(label)]
    return plain[0] if plain else labels[0]


def _names_unregularized(label: str) -> bool:
    """Whether ``label`` is the label of an unregularized condition (False for any other text)."""
    try:
        return Condition.parse(label).is_unregularized
    except ValueError:
        return False


def expand_variants(train_section: Mapping[str, Any]) -> "OrderedDict[str, dict[str, Any]]":
    """Expand ``grid`` (product over axes, in :data:`AXIS_ORDER`) and ``extra_variants`` into ``{name: settings}``.

    ``settings`` is ``options`` overlaid with the variant's axis values; every axis in ``grid`` and
    every key of an extra variant also appears in the name, so two variants never share a folder.

    Raises:
        ValueError: if two variants would get the same name.
    """
    options = dict(train_section.get("options", {}) or {})
    grid = canonical_axes(train_section.get("grid", {}) or {})
    variants: "OrderedDict[str, dict[str, Any]]" = OrderedDict()

    def add(axes: Mapping[str, Any]) -> None:
        name = variant_name(axes)
        if name in variants:
            raise ValueError(f"train: two variants are both named {name!r}; make grid/extra_variants distinct")
        settings = copy.deepcopy(options)
        settings.update(copy.deepcopy(dict(canonical_axes(axes))))
        variants[name] = settings

    if grid:
        for values in itertools.product(*grid.values()):
            add(dict(zip(grid.keys(), values)))
    for extra in train_section.get("extra_variants", []) or []:
        add(extra)
    return variants


def sweep_point(settings: Mapping[str, Any]) -> tuple[str, float] | None:
    """Where a variant sits in a claim-4 coefficient sweep: ``("baseline", 0.0)`` when unregularized (no weight
    penalty in effect, no sparsity regularizer: coefficient 0 of every sweep), ``(regularizer kind, coefficient)``
    for a sparsity regularizer alone, ``("<penalty kind>_weight", coefficient)`` (e.g. ``l2_weight``) for a weight
    penalty alone, None for both at once (on no one-factor curve)."""
    condition = Condition.of_settings(settings)
    if condition.is_unregularized:
        return ("baseline", 0.0)
    if condition.regularizer_kind == "none":
        return (f"{condition.penalty_kind}_weight", condition.penalty_coefficient)
    if condition.penalty_coefficient == 0:
        return (condition.regularizer_kind, condition.regularizer_coefficient)
    return None


def claim4_sweeps(variants: Mapping[str, Mapping[str, Any]]) -> "OrderedDict[str, list[dict[str, Any]]]":
    """The coefficient sweeps of a training grid: ``{regularizer: [{variant, k, coefficient}, ...]}``.

    A regularizer (sparsity regularizer kind, or ``<kind>_weight`` for a weight penalty) is swept when its
    variants have at least two distinct non-zero coefficients; its list holds those variants and, at each of
    their training k, the unregularized variant (coefficient 0), sorted by k then coefficient. Empty when
    nothing is swept (then the claim-4 rule is not part of the run).

    Raises:
        ValueError: when two variants fall on the same (regularizer, k, coefficient), e.g. differing only in an
            axis the sweep does not separate (architecture, d_sae).
    """
    points: dict[tuple[str, int, float], str] = {}
    for name, settings in variants.items():
        point = sweep_point(settings)
        if point is None:
            continue
        k = int(TrainSettings.from_mapping(settings).k)
        key = (point[0], k, float(point[1]))
        if key in points:
            raise ValueError(f"claim 4: variants {points[key]!r} and {name!r} are both {key[0]} coefficient {key[2]:g} at k={k}")
        points[key] = name
    sweeps: "OrderedDict[str, list[dict[str, Any]]]" = OrderedDict()
    for regularizer in dict.fromkeys(key[0] for key in points if key[0] != "baseline"):
        mine = [key for key in points if key[0] == regularizer]
        if len({coefficient for _, _, coefficient in mine}) < 2:
            continue
        ks = sorted({k for _, k, _ in mine})
        entries = [{"variant": points[("baseline", k, 0.0)], "k": k, "coefficient": 0.0} for k in ks if ("baseline", k, 0.0) in points]
        entries += [{"variant": points[key], "k": key[1], "coefficient": key[2]} for key in mine]
        sweeps[regularizer] = sorted(entries, key=lambda entry: (entry["k"], entry["coefficient"]))
    return sweeps


def digits_cell(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The grid cell of a digits variant: penalty kind and coefficient, tied init, unit-norm decoder
    (a setting the variant leaves out takes the trainer's default)."""
    resolved = TrainSettings.from_mapping(settings)
    condition = Condition.of_settings(resolved.as_dict())
    kind = condition.penalty_kind if condition.penalty_coefficient != 0 else "none"
    return {
        "weight_penalty": kind,
        "penalty_coefficient": condition.penalty_coefficient if kind != "none" else 0.0,
        "tied_init": resolved.tied_init,
        "unit_norm_decoder": resolved.unit_norm_decoder,
    }


def seed_groups(seeds: Sequence[int], seeds_per_job: int) -> list[list[int]]:
    """Split ``seeds`` into consecutive groups of at most ``seeds_per_job`` (one training job each)."""
    if seeds_per_job < 1:
        raise ValueError("train.seeds_per_job must be at least 1")
    seeds = [int(seed) for seed in seeds]
    return [seeds[start : start + seeds_per_job] for start in range(0, len(seeds), seeds_per_job)]


def seed_group_label(group: Sequence[int]) -> str:
    """Folder label of a seed group, e.g. ``seeds0-1-2``."""
    return "seeds" + "-".join(str(int(seed)) for seed in group)


# ----------------------------------------------------------------------------------------------
# Paths


@dataclass(frozen=True)
class ResultsLayout:
    """Every output path of the pipeline under ``root`` (the config's ``results_dir``).

    Arguments may be ``{wildcard}`` placeholders (rules) or values (stages); the result is a string.
    """

    root: str

    # corpus, subject model, cache
    def corpus_documents(self) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/corpus/documents.jsonl"

    def subject_model(self) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/subject_model"

    def cache_dir(self, experiment: str) -> str:
        return f"{self.root}/{experiment}/cache"

    def cache_manifest(self, experiment: str) -> str:
        return f"{self.cache_dir(experiment)}/manifest.json"

    # training
    def sae_group_dir(self, experiment: str, variant: str, group: str) -> str:
        """One training job's folder: ``seed<s>/`` per seed and ``curves.parquet``."""
        return f"{self.root}/{experiment}/sae/{variant}/{group}"

    def sae_dir(self, experiment: str, variant: str, group: str, seed: int | str) -> str:
        """One trained SAE (cfg.json + sae_weights.safetensors + sparsity.safetensors + metrics.json)."""
        return f"{self.sae_group_dir(experiment, variant, group)}/seed{seed}"

    def train_state_dir(self, experiment: str, variant: str, group: str) -> str:
        """Resumable training state (not an output, so Snakemake leaves it alone when a job is killed)."""
        return f"{self.root}/{experiment}/.train_state/{variant}/{group}"

    # per-variant stages
    def match_file(self, experiment: str, variant: str, output: str) -> str:
        return f"{self.root}/{experiment}/match/{variant}/{MATCH_OUTPUTS[output]}"

    def autointerp_file(self, variant: str, seed: int | str, output: str) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/autointerp/{variant}/seed{seed}/{AUTOINTERP_OUTPUTS[output]}"

    def steer_file(self, variant: str, seed: int | str, output: str) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/steer/{variant}/seed{seed}/{STEER_OUTPUTS[output]}"

    def evaluate_file(self, variant: str, seed: int | str, output: str) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/evaluate/{variant}/seed{seed}/{EVALUATE_OUTPUTS[output]}"

    # whole-run outputs
    def claim4_file(self, output: str) -> str:
        """What the claim-4 stage writes (the regularizer-strength sweep's table, summary, markdown section)."""
        return f"{self.root}/{LANGUAGE_MODEL}/claim4/{CLAIM4_OUTPUTS[output]}"

    def claim4_plot(self, plot: str, regularizer: str) -> str:
        """One claim-4 figure (``plot`` in :data:`CLAIM4_PLOTS`) of one swept regularizer."""
        if plot not in CLAIM4_PLOTS:
            raise ValueError(f"unknown claim-4 plot {plot!r}; expected one of {CLAIM4_PLOTS}")
        return f"{self.root}/{LANGUAGE_MODEL}/claim4/plots/{plot}_{regularizer}.png"

    def judge_file(self, output: str) -> str:
        """What the judge-accuracy stage writes (the judges' accuracy on held-out labelled cases)."""
        return f"{self.root}/{LANGUAGE_MODEL}/judges/{JUDGE_OUTPUTS[output]}"

    def regress_file(self, output: str) -> str:
        return f"{self.root}/{LANGUAGE_MODEL}/regress/{REGRESS_OUTPUTS[output]}"

    def browser_records(self, variant: str) -> str:
        """One condition's gathered feature records (``records.json``: list, pages, contexts), read by the site builder."""
        return f"{self.root}/{LANGUAGE_MODEL}/browser/records/{variant}.json"

    def browser_file(self, output: str) -> str:
        """The static site: ``index.html``, ``feature.html`` and the ``data/`` folder of JS data files."""
        return f"{self.root}/{LANGUAGE_MODEL}/browser/{BROWSER_OUTPUTS[output]}"

    def digits_file(self, output: str) -> str:
        return f"{self.root}/{DIGITS}/{DIGITS_OUTPUTS[output]}"

    def judge_cache(self, template: str) -> str:
        """The judge response cache folder from its setting (``{results_dir}`` replaced)."""
        return template.format(results_dir=self.root)

    def log(self, rule: str, *parts: str) -> str:
        """One job's log: ``logs/<rule>.log`` or ``logs/<rule>/<parts...>.log``."""
        return f"{self.root}/logs/{'/'.join((rule, *parts))}.log" if parts else f"{self.root}/logs/{rule}.log"


class Experiment:
    """A config bound to its layout: the variants, seed groups and per-stage inputs of one run.

    Args:
        config: the whole validated config (``results_dir``, ``train``, ``digits``, ...).
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.layout = ResultsLayout(str(config["results_dir"]))
        self._variants: dict[str, "OrderedDict[str, dict[str, Any]]"] = {}

    def train_section(self, experiment: str) -> Mapping[str, Any]:
        """The training grid of an experiment: ``train`` for the language model, ``digits.train`` for digits."""
        if experiment == LANGUAGE_MODEL:
            return self.config["train"]
        if experiment == DIGITS:
            return self.config["digits"]["train"]
        raise ValueError(f"unknown experiment {experiment!r}; expected one of {EXPERIMENTS}")

    def check_settings(self) -> None:
        """Cross-field checks at DAG build, before any job runs: every variant's training settings
        (k and Matryoshka prefixes within d_sae, ...; aux_k is clamped to d_sae by the trainer) and the subject model's hook name.

        Raises:
            ValueError: naming the experiment, the variant and the setting.
        """
        SubjectModelSettings.from_mapping(self.config.get("subject_model")).validate()
        self.evaluate_seeds()
        for experiment in EXPERIMENTS if self.has_digits() else (LANGUAGE_MODEL,):
            section = "train" if experiment == LANGUAGE_MODEL else "digits.train"
            for name, settings in self.variants(experiment).items():
                try:
                    TrainSettings.from_mapping(settings)
                except ValueError as error:
                    raise ValueError(f"{section}: variant {name!r} (train options overlaid with its grid axes): {error}") from error

    def has_digits(self) -> bool:
        return "digits" in self.config

    def variants(self, experiment: str) -> "OrderedDict[str, dict[str, Any]]":
        """Ordered ``{variant name: settings}`` of an experiment's grid."""
        if experiment not in self._variants:
            self._variants[experiment] = expand_variants(self.train_section(experiment))
        return self._variants[experiment]

    def variant_settings(self, experiment: str, variant: str) -> dict[str, Any]:
        """Settings of one variant; a ``ValueError`` lists the configured variants when it is unknown."""
        variants = self.variants(experiment)
        if variant not in variants:
            raise ValueError(f"train: no variant {variant!r}; the configured variants are {list(variants)}")
        return dict(variants[variant])

    def condition(self, variant: str) -> Condition:
        """The regularization condition of a language-model variant."""
        return Condition.of_settings(self.variant_settings(LANGUAGE_MODEL, variant))

    def seeds(self, experiment: str) -> list[int]:
        return [int(seed) for seed in self.train_section(experiment)["seeds"]]

    def groups(self, experiment: str) -> list[list[int]]:
        """Seed groups of an experiment (each group is one training job)."""
        section = self.train_section(experiment)
        return seed_groups(section["seeds"], int(section["seeds_per_job"]))

    def group_labels(self, experiment: str) -> list[str]:
        return [seed_group_label(group) for group in self.groups(experiment)]

    def group_of(self, experiment: str, seed: int | str) -> str:
        """Label of the seed group that trains ``seed``."""
        for group in self.groups(experiment):
            if int(seed) in group:
                return seed_group_label(group)
        raise ValueError(f"seed {seed} is not in {experiment} train.seeds {self.seeds(experiment)}")

    def group_seeds(self, experiment: str, label: str) -> list[int]:
        """The seeds of the group labelled ``label``; ``ValueError`` naming the configured groups otherwise."""
        for group in self.groups(experiment):
            if seed_group_label(group) == label:
                return list(group)
        raise ValueError(f"train: no seed group {label!r}; the configured groups are {self.group_labels(experiment)}")

    def sae_group_dirs(self, experiment: str, variant: str) -> list[str]:
        """Training output folders of a variant, one per seed group."""
        return [self.layout.sae_group_dir(experiment, variant, label) for label in self.group_labels(experiment)]

    def sae_group_dir_of(self, experiment: str, variant: str, seed: int | str) -> str:
        """The training job folder that holds the SAE of ``seed``."""
        return self.layout.sae_group_dir(experiment, variant, self.group_of(experiment, seed))

    def sae_dir_of(self, experiment: str, variant: str, seed: int | str) -> str:
        """Folder of one trained SAE."""
        return self.layout.sae_dir(experiment, variant, self.group_of(experiment, seed), seed)

    def sae_dirs(self, experiment: str, variant: str) -> dict[int, str]:
        """``{seed: SAE folder}`` of every seed of a variant, in seed order of the config."""
        return {seed: self.sae_dir_of(experiment, variant, seed) for seed in self.seeds(experiment)}

    def curves_files(self, experiment: str, variant: str) -> list[str]:
        """Each training job's ``curves.parquet`` of a variant."""
        return [f"{folder}/{SAE_CURVES}" for folder in self.sae_group_dirs(experiment, variant)]

    def metrics_files(self, experiment: str, variant: str) -> list[str]:
        """Each seed's ``metrics.json`` of a variant."""
        return [f"{folder}/{SAE_METRICS}" for folder in self.sae_dirs(experiment, variant).values()]

    def evaluate_seeds(self) -> list[int]:
        """The seeds evaluated for every language-model variant (``evaluate.seed`` and ``evaluate.seeds``)."""
        return EvaluateSettings.from_mapping(self.config.get("evaluate")).evaluated_seeds(self.seeds(LANGUAGE_MODEL))

    def claim4_inputs(self) -> "OrderedDict[str, list[dict[str, Any]]]":
        """The claim-4 sweeps (:func:`claim4_sweeps`), each entry with ``condition`` and, per evaluated seed,
        its evaluate outputs: ``seeds: {seed: {metrics, k_robustness, probing}}``. Empty when nothing is swept."""
        sweeps = claim4_sweeps(self.variants(LANGUAGE_MODEL))
        seeds = self.evaluate_seeds()
        return OrderedDict(
            (regularizer, [
                {**entry, "condition": self.condition(entry["variant"]).label, "seeds": {
                    str(seed): {output: self.layout.evaluate_file(entry["variant"], seed, output) for output in ("metrics", "k_robustness", "probing")}
                    for seed in seeds
                }}
                for entry in entries
            ])
            for regularizer, entries in sweeps.items()
        )

    def claim4_input_files(self) -> list[str]:
        """Every evaluate output the claim-4 stage reads, each once, in a stable order."""
        files = [path for entries in self.claim4_inputs().values() for entry in entries for outputs in entry["seeds"].values() for path in outputs.values()]
        return list(dict.fromkeys(files))

    def regress_inputs(self) -> dict[str, dict[str, Any]]:
        """Per language-model variant: its condition label and the other stages' outputs the regress stage reads."""
        layout = self.layout
        seeds = {stage: int(self.config[stage]["seed"]) for stage in ("autointerp", "steer", "evaluate")}
        inputs = {}
        for variant in self.variants(LANGUAGE_MODEL):
            inputs[variant] = {
                "condition": self.condition(variant).label,
                "match_summary": layout.match_file(LANGUAGE_MODEL, variant, "summary"),
                "match_features": layout.match_file(LANGUAGE_MODEL, variant, "features"),
                "autointerp_scores": layout.autointerp_file(variant, seeds["autointerp"], "scores"),
                "steer_rows": layout.steer_file(variant, seeds["steer"], "rows"),
                "evaluate_metrics": layout.evaluate_file(variant, seeds["evaluate"], "metrics"),
                "evaluate_k_robustness": layout.evaluate_file(variant, seeds["evaluate"], "k_robustness"),
                "evaluate_probing": layout.evaluate_file(variant, seeds["evaluate"], "probing"),
                "evaluate_latents": layout.evaluate_file(variant, seeds["evaluate"], "latents"),
                "sae_group_dirs": self.sae_group_dirs(LANGUAGE_MODEL, variant),
                "training_curves": self.curves_files(LANGUAGE_MODEL, variant),
                "autointerp_controls": layout.autointerp_file(variant, seeds["autointerp"], "controls"),
                "steer_controls": layout.steer_file(variant, seeds["steer"], "controls"),
            }
        return inputs

    def browser_inputs(self, variant: str) -> dict[str, Any]:
        """What the browser gathers for one language-model variant: match outputs, the interpreted seed's
        autointerp/steer/evaluate outputs, and every seed's SAE folder (partners' contexts are mined)."""
        layout = self.layout
        seeds = {stage: int(self.config[stage]["seed"]) for stage in ("autointerp", "steer", "evaluate")}
        return {
            "condition": self.condition(variant).label,
            "match_features": layout.match_file(LANGUAGE_MODEL, variant, "features"),
            "match_summary": layout.match_file(LANGUAGE_MODEL, variant, "summary"),
            "match_histogram": layout.match_file(LANGUAGE_MODEL, variant, "histogram"),
            "autointerp_scores": layout.autointerp_file(variant, seeds["autointerp"], "scores"),
            "steer_rows": layout.steer_file(variant, seeds["steer"], "rows"),
            "evaluate_latents": layout.evaluate_file(variant, seeds["evaluate"], "latents"),
            "sae_dirs": {str(seed): folder for seed, folder in self.sae_dirs(LANGUAGE_MODEL, variant).items()},
            "sae_group_dirs": self.sae_group_dirs(LANGUAGE_MODEL, variant),
        }

    def digits_regress_inputs(self) -> dict[str, dict[str, Any]]:
        """Per digits cell (variant): its label and match outputs (claim 1 in the summary)."""
        if not self.has_digits():
            return {}
        return {
            variant: {
                "condition": variant,
                "match_features": self.layout.match_file(DIGITS, variant, "features"),
                "match_summary": self.layout.match_file(DIGITS, variant, "summary"),
            }
            for variant in self.variants(DIGITS)
        }


# Entries of a stage-inputs mapping that are not rule inputs: a label, and files inside a training
# job's directory output (Snakemake tracks the directory, which is listed too).
_NOT_RULE_INPUTS = ("condition", "training_curves")


def input_files(inputs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The rule inputs in ``{variant: {key: path or [paths]}}``, in a stable order."""
    files: list[str] = []
    for entry in inputs.values():
        for key, value in entry.items():
            if key not in _NOT_RULE_INPUTS:
                files.extend(value if isinstance(value, list) else [value])
    return files
