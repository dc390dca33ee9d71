"""Per-feature records of one condition (variant) for the feature browser.

Gathers, for the match stage's reference seed, what the stages wrote about each feature (paths from
:meth:`sae_pipeline.layout.Experiment.browser_inputs`):

- ``match/features.parquet``: category (always / sometimes / never / dead), share count, firing frequency,
  and per other seed the decoder/encoder partner and cosine;
- ``autointerp/scores.parquet``: explanation, detection and fuzzing scores (the interpreted seed only);
- ``steer/rows.parquet``: steered vs unsteered continuations and each judge's success;
- ``evaluate/latents.parquet``: the latent's top token.

The stages keep no contexts, so the contexts of the features that get a page, and of their partners in
every other seed, are mined again from the activation cache (:func:`mine_page_contexts`, one pass per seed).
The records are one JSON document; :mod:`sae_pipeline.browser.site` turns them into the site.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from sae_pipeline.settings import BrowserSettings, MiningSettings

logger = logging.getLogger(__name__)

# Columns of the feature list, in the order the index shows them.
LIST_COLUMNS = (
    "feature",
    "category",
    "share_count",
    "firing_frequency",
    "interp_score",
    "steering_success",
    "explanation",
    "page",
)

# (features of one seed) -> {feature: {"top": [context], "quantiles": [[context]], "max_activation", "n_firing_tokens"}};
# a context is {"tokens": [text], "activations": [float]}.
ContextMiner = Callable[[str, Sequence[int]], dict[int, dict[str, Any]]]


def _number(value: Any, digits: int = 4) -> float | None:
    """A finite float rounded to ``digits`` significant places, else None (JSON has no NaN)."""
    if value is None or value is pd.NA:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _read_optional(path: str, reader: Callable[[str], pd.DataFrame]) -> pd.DataFrame | None:
    """``reader(path)`` when the file exists (a stage that selects no feature may leave an empty table), else None."""
    return reader(path) if Path(path).exists() else None


def steering_success(rows: pd.DataFrame | None, judges: Sequence[str]) -> tuple[dict[int, float], str | None]:
    """Per feature, the fraction of steered continuations judged a success by the first of ``judges`` that ran.

    Returns ``({feature: success rate in [0, 1]}, judge name)``; ``({}, None)`` when no judge has a verdict.
    """
    if rows is None or rows.empty:
        return {}, None
    for judge in judges:
        column = f"{judge}_success"
        if column in rows and rows[column].notna().any():
            judged = rows[rows[column].notna()]
            rates = judged.groupby("feature")[column].apply(lambda values: float(values.astype(float).mean()))
            return {int(feature): float(rate) for feature, rate in rates.items()}, judge
    return {}, None


def _partner_value(explained: pd.DataFrame | None, feature: int, column: str) -> Any:
    """A partner column of the autointerp table for ``feature`` (None when absent: seed not in autointerp.partner_seeds)."""
    if explained is None or column not in explained.columns or feature not in explained.index:
        return None
    value = explained.at[feature, column]
    return None if pd.isna(value) else (str(value) if isinstance(value, str) else value)


def feature_list(features: pd.DataFrame, scores: pd.DataFrame | None, success: Mapping[int, float]) -> pd.DataFrame:
    """One row per reference-seed feature with the :data:`LIST_COLUMNS` (``page`` filled later: -1 = no page).

    ``interp_score`` is the detection score; features that were not interpreted or not steered have None.
    """
    table = features[["feature", "category", "share_count", "firing_frequency"]].copy()
    table["feature"] = table["feature"].astype(int)
    explained = scores.set_index("feature") if scores is not None and not scores.empty else None
    table["interp_score"] = [
        _number(explained["detection_score"].get(feature)) if explained is not None else None for feature in table["feature"]
    ]
    table["explanation"] = [
        str(explained["explanation"].get(feature))
        if explained is not None and pd.notna(explained["explanation"].get(feature))
        else ""
        for feature in table["feature"]
    ]
    table["steering_success"] = [_number(success.get(feature)) for feature in table["feature"]]
    table["page"] = -1
    return table


def page_features(table: pd.DataFrame, max_pages: int) -> list[int]:
    """The features that get a page: explained or steered ones first, then by share count and firing
    frequency (both descending), dead latents never; at most ``max_pages``, in that order."""
    alive = table[table["category"] != "dead"].copy()
    alive["studied"] = alive["interp_score"].notna() | alive["steering_success"].notna()
    ordered = alive.sort_values(
        ["studied", "share_count", "firing_frequency", "feature"], ascending=[False, False, False, True], kind="stable"
    )
    return [int(feature) for feature in ordered["feature"].head(int(max_pages))]


def partner_columns(features: pd.DataFrame, seeds: Sequence[int], reference_seed: int) -> dict[int, dict[str, str]]:
    """Per other seed, the match table's columns of its partner: ``decoder_partner``, ``decoder_cosine``,
    ``encoder_partner``, ``encoder_cosine``, ``shared`` (the pair's shared flag)."""
    columns = {}
    for seed in seeds:
        if seed == reference_seed:
            continue
        low, high = sorted((reference_seed, seed))
        columns[seed] = {
            "decoder_partner": f"decoder_partner_seed{seed}",
            "decoder_cosine": f"decoder_cosine_seed{seed}",
            "encoder_partner": f"encoder_partner_seed{seed}",
            "encoder_cosine": f"encoder_cosine_seed{seed}",
            "shared": f"shared_seeds{low}-{high}",
        }
        missing = [name for name in columns[seed].values() if name not in features]
        if missing:
            raise ValueError(f"match features table lacks columns {missing} for seed {seed}")
    return columns


def steering_examples(rows: pd.DataFrame | None, judges: Sequence[str]) -> dict[int, list[dict[str, Any]]]:
    """Per steered feature, its steered vs unsteered continuations: prompt, both texts, strength, each judge's score and verdict."""
    if rows is None or rows.empty:
        return {}
    examples: dict[int, list[dict[str, Any]]] = {}
    for row in rows.itertuples(index=False):
        row = row._asdict()
        verdicts = {
            judge: {
                "score": _number(row.get(f"{judge}_score")),
                "success": None if pd.isna(row.get(f"{judge}_success")) else bool(row.get(f"{judge}_success")),
            }
            for judge in judges
            if f"{judge}_success" in row
        }
        examples.setdefault(int(row["feature"]), []).append(
            {
                "prompt": row["prompt"],
                "unsteered": row["original"],
                "steered": row["steered"],
                "strength": _number(row.get("strength")),
                "judges": verdicts,
            }
        )
    return examples


def gather_records(
    inputs: Mapping[str, Any], settings: BrowserSettings | Mapping[str, Any] | None, judges: Sequence[str], miner: ContextMiner
) -> dict[str, Any]:
    """Everything the browser shows about one variant.

    Args:
        inputs: :meth:`~sae_pipeline.layout.Experiment.browser_inputs` of the variant (``variant`` added).
        settings: the ``browser`` section.
        judges: steering judges in order of preference (``steer.judges``); the first with verdicts is the list's success.
        miner: ``miner(sae folder, features)`` -> contexts per feature (:func:`mine_page_contexts` bound to a cache).

    Returns a JSON-ready dict: ``variant``, ``condition``, ``seeds``, ``reference_seed``, ``summary`` (the match
    summary's mean over seed pairs and reference counts), ``list`` (columns + rows of every feature), ``pages``
    (``{feature: page}``, in page order).
    """
    settings = BrowserSettings.from_mapping(settings)
    features = pd.read_parquet(inputs["match_features"])
    summary = json.loads(Path(inputs["match_summary"]).read_text())
    reference_seed = int(summary["reference_seed"])
    seeds = [int(seed) for seed in summary["seeds"]]
    features = features[features["seed"] == reference_seed].sort_values("feature").reset_index(drop=True)
    scores = _read_optional(inputs["autointerp_scores"], pd.read_parquet)
    rows = _read_optional(inputs["steer_rows"], pd.read_parquet)
    latents = _read_optional(inputs["evaluate_latents"], pd.read_parquet)
    success, success_judge = steering_success(rows, judges)
    table = feature_list(features, scores, success)
    chosen = page_features(table, settings.max_feature_pages)
    table.loc[table["feature"].isin(chosen), "page"] = 1
    partners = partner_columns(features, seeds, reference_seed)
    by_feature = features.set_index("feature")
    sae_dirs = {int(seed): folder for seed, folder in inputs["sae_dirs"].items()}
    own_contexts = miner(sae_dirs[reference_seed], chosen)
    partner_contexts = {}
    for seed, names in partners.items():
        wanted = sorted({int(by_feature.at[feature, names["decoder_partner"]]) for feature in chosen} - {-1})
        partner_contexts[seed] = miner(sae_dirs[seed], wanted)
    top_tokens = latents.set_index("latent")["top_token"] if latents is not None and "top_token" in latents else None
    explained = scores.set_index("feature") if scores is not None and not scores.empty else None
    listed = table.set_index("feature")
    steering = steering_examples(rows, judges)
    pages = {}
    for feature in chosen:
        entry = listed.loc[feature]
        page: dict[str, Any] = {
            "feature": feature,
            "category": entry["category"],
            "share_count": int(entry["share_count"]),
            "firing_frequency": _number(entry["firing_frequency"]),
            "explanation": entry["explanation"],
            "detection_score": entry["interp_score"],
            "fuzzing_score": _number(explained["fuzzing_score"].get(feature)) if explained is not None else None,
            "steering_success": entry["steering_success"],
            "top_token": None if top_tokens is None or feature not in top_tokens.index else str(top_tokens[feature]),
            "contexts": own_contexts.get(feature, {}),
            "steering": steering.get(feature, []),
            "partners": [],
        }
        for seed, names in partners.items():
            partner = int(by_feature.at[feature, names["decoder_partner"]])
            page["partners"].append(
                {
                    "seed": seed,
                    "feature": partner,
                    "decoder_cosine": _number(by_feature.at[feature, names["decoder_cosine"]]),
                    "encoder_partner": int(by_feature.at[feature, names["encoder_partner"]]),
                    "encoder_cosine": _number(by_feature.at[feature, names["encoder_cosine"]]),
                    "shared": bool(by_feature.at[feature, names["shared"]]),
                    "contexts": partner_contexts[seed].get(partner, {}),
                    # autointerp.partner_seeds: the partner's explanation (same backend) and its agreement with this one's
                    "explanation": _partner_value(explained, feature, f"partner_explanation_seed{seed}"),
                    "explanation_agreement": _number(_partner_value(explained, feature, f"explanation_agreement_seed{seed}")),
                }
            )
        pages[str(feature)] = page
    return {
        "variant": inputs["variant"],
        "condition": inputs["condition"],
        "seeds": seeds,
        "reference_seed": reference_seed,
        "success_judge": success_judge,
        "summary": {
            "mean_over_pairs": {key: _number(value) for key, value in summary.get("mean_over_pairs", {}).items()},
            "reference_counts": summary.get("reference_counts", {}),
            "threshold": summary.get("threshold"),
        },
        "histogram": inputs.get("match_histogram"),
        "list": {
            "columns": list(LIST_COLUMNS),
            "rows": [[_plain(row[column]) for column in LIST_COLUMNS] for _, row in table.iterrows()],
        },
        "pages": pages,
    }


def _plain(value: Any) -> Any:
    """A list cell as a JSON value (floats rounded, NaN as None)."""
    if isinstance(value, (float, np.floating)):
        return _number(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def contexts_of(
    examples: Any, sequences: np.ndarray, token_text: Callable[[int], str], settings: BrowserSettings, random_seed: int
) -> dict[str, Any]:
    """One feature's mined examples as the page shows them: the top contexts and ``quantile_contexts`` drawn
    from each of ``n_quantiles`` equal-count activation quantiles of the sampled activating contexts (lowest first)."""
    from sae_pipeline.features.contexts import build_contexts

    def shown(context_set: Any) -> list[dict[str, Any]]:
        return [
            {
                "tokens": [token_text(token) for token in context.token_ids],
                "activations": [_number(value, 3) for value in context.activations],
            }
            for context in build_contexts(context_set, sequences)
        ]

    rng = np.random.default_rng([int(random_seed), int(examples.feature)])
    quantiles = []
    if len(examples.sampled):
        order = np.argsort(examples.sampled.activations.max(axis=1), kind="stable")
        for part in np.array_split(order, int(settings.n_quantiles)):
            quantiles.append(shown(examples.sampled.subset(rng.permutation(part)[: int(settings.quantile_contexts)])))
    return {
        "top": shown(examples.top.subset(np.arange(min(int(settings.top_contexts), len(examples.top))))),
        "quantiles": quantiles,
        "max_activation": _number(examples.max_activation),
        "n_firing_tokens": int(examples.n_firing_tokens),
    }


def mine_page_contexts(
    cache_dir: str, mining: MiningSettings | Mapping[str, Any] | None, settings: BrowserSettings | Mapping[str, Any] | None
) -> ContextMiner:
    """A :data:`ContextMiner` over the activation cache at ``cache_dir``: one streaming pass per call
    (:func:`sae_pipeline.features.mining.mine_examples`), windows as ``autointerp.mining`` sets them."""
    from transformers import AutoTokenizer

    from sae_pipeline.data.checkpoint import load_sae
    from sae_pipeline.data.shards import ActivationStore
    from sae_pipeline.features.contexts import TokenText
    from sae_pipeline.features.mining import mine_examples
    from sae_pipeline.runtime.devices import resolve_device

    settings = BrowserSettings.from_mapping(settings)
    mining = MiningSettings.from_mapping(mining)
    mining = MiningSettings.from_mapping(
        {
            **mining.as_dict(),
            "n_top": int(settings.top_contexts),
            "n_activating_sample": max(int(settings.n_quantiles) * int(settings.quantile_contexts) * 4, 1),
            "n_non_activating": 1,
        }
    )
    store = ActivationStore(cache_dir)
    sequences = store.sequences()
    token_text = TokenText(AutoTokenizer.from_pretrained(store.manifest["model"]))
    device = resolve_device(mining.device)

    def miner(sae_folder: str, features: Sequence[int]) -> dict[int, dict[str, Any]]:
        if not features:
            return {}
        logger.info("browser: mining contexts of %d features of %s", len(features), sae_folder)
        examples = mine_examples(store, load_sae(sae_folder, device), list(features), mining, int(settings.random_seed))
        return {
            int(feature): contexts_of(found, sequences, token_text, settings, int(settings.random_seed))
            for feature, found in examples.items()
        }

    return miner
