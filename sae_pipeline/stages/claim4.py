"""Claim-4 stage: the regularizer-strength sweep ("Beyond the Hard Budget": off-support L1 and the L1/L2-ratio
penalty make latents more monosemantic at no reconstruction cost, and reconstruction robust to the inference k).

Reads the evaluate outputs of every sweep variant on every evaluated seed (``Experiment.claim4_inputs``:
per regularizer, variants at each training k and coefficient, coefficient 0 being the unregularized variant)
and writes:

- ``seeds.csv``: one row per (regularizer, k, coefficient, seed) with that seed's figures (:data:`METRICS`,
  FVU at each inference multiplier ``fvu_x<m>``, probing accuracy per budget ``probe_m<m>``, the mean over
  the token properties);
- ``table.csv``: per (regularizer, k, coefficient) the seed mean of every figure with its normal 95% interval
  over seeds (``<figure>_mean``, ``_ci_low``, ``_ci_high``; :func:`sae_pipeline.stats.intervals.mean_with_interval`);
- ``k_robustness.csv`` and ``probing.csv``: the long per-seed rows behind the curves;
- ``claim4_summary.json`` and ``claim4.md``: per regularizer and k the largest harmless coefficient
  (:func:`sae_pipeline.stats.tradeoff.largest_harmless_coefficient` on FVU) and, at it, the differences against
  coefficient 0 (Welch 95% intervals, :func:`~sae_pipeline.stats.tradeoff.reconstruction_cost_interval`) of
  CE-loss recovered, the monosemanticity proxies, effective latents per token and FVU at each inference k';
- the figures of :mod:`sae_pipeline.report.claim4_plots` per regularizer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from sae_pipeline.data.atomic import write_dataframe, write_json, write_text
from sae_pipeline.report.claim4_plots import plot_k_robustness_sweep, plot_probing_sweep, plot_tradeoff
from sae_pipeline.report.tables import format_interval, markdown_table
from sae_pipeline.stats.intervals import mean_with_interval
from sae_pipeline.stats.tradeoff import largest_harmless_coefficient, reconstruction_cost_interval

logger = logging.getLogger("sae_pipeline.stages.claim4")

# Per-seed figure: (keys into metrics.json, what a larger value means).
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "fvu": (("at_trained_k", "fvu"), "worse reconstruction"),
    "ce_loss_recovered": (("at_trained_k", "ce_loss_recovered"), "better reconstruction"),
    "l0": (("at_trained_k", "l0"), ""),
    "effective_latents": (("effective_latents_per_token", "mean"), "more latents share each token's code"),
    "l1_over_l2": (("l1_over_l2", "mean"), ""),
    "never_fired_on_eval_fraction": (("firing", "dead_fraction"), ""),
    "top_token_mass_share": (("monosemanticity", "top_token_mass_share", "mean"), "more monosemantic"),
    "token_entropy_bits": (("monosemanticity", "top_activation_token_entropy_bits", "mean"), "less monosemantic"),
    "embedding_similarity": (("monosemanticity", "embedding_similarity", "mean"), "more monosemantic"),
}
# The monosemanticity proxies (and effective latents) the summary reports gains of, in this order.
GAIN_FIGURES = ("top_token_mass_share", "token_entropy_bits", "embedding_similarity", "effective_latents", "ce_loss_recovered")
KEYS = ["regularizer", "k", "coefficient"]


def _lookup(metrics: Mapping[str, Any], keys: Sequence[str]) -> float:
    value: Any = metrics
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return float("nan")
        value = value[key]
    return float("nan") if value is None else float(value)


def load_seed_rows(layout: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(seed rows, k-robustness rows, probing rows)`` of every sweep entry and evaluated seed (see the module docstring)."""
    seed_rows, robustness, probing = [], [], []
    for regularizer, entries in layout.items():
        for entry in entries:
            for seed, paths in entry["seeds"].items():
                identity = {"regularizer": regularizer, "k": int(entry["k"]), "coefficient": float(entry["coefficient"]),
                            "variant": entry["variant"], "condition": entry.get("condition", ""), "seed": int(seed)}
                metrics = json.loads(Path(paths["metrics"]).read_text())
                row = {**identity, **{name: _lookup(metrics, keys) for name, (keys, _) in METRICS.items()}}
                curve = pd.read_csv(paths["k_robustness"]).dropna(subset=["multiplier"])
                for item in curve.itertuples():
                    row[f"fvu_x{item.multiplier:g}"] = float(item.fvu)
                    robustness.append({**identity, "multiplier": float(item.multiplier), "k_prime": int(item.k_prime), "fvu": float(item.fvu),
                                       "ce_loss_recovered": float(item.ce_loss_recovered) if pd.notna(item.ce_loss_recovered) else float("nan")})
                probes = pd.read_csv(paths["probing"])
                if "m" in probes.columns:
                    probes = probes.dropna(subset=["m"])
                    for item in probes.itertuples():
                        probing.append({**identity, "property": item.property, "m": int(item.m), "test_balanced_accuracy": float(item.test_balanced_accuracy)})
                    for m, group in probes.groupby(probes["m"].astype(int)):
                        row[f"probe_m{m}"] = float(group["test_balanced_accuracy"].mean())
                seed_rows.append(row)
    return pd.DataFrame(seed_rows), pd.DataFrame(robustness), pd.DataFrame(probing)


def figure_columns(seeds: pd.DataFrame) -> list[str]:
    """The per-seed figure columns of ``seeds`` (metrics, ``fvu_x<m>`` in multiplier order, ``probe_m<m>`` in budget order)."""
    present = [name for name in METRICS if name in seeds.columns and seeds[name].notna().any()]
    curve = sorted((column for column in seeds.columns if column.startswith("fvu_x")), key=lambda column: float(column[5:]))
    probes = sorted((column for column in seeds.columns if column.startswith("probe_m")), key=lambda column: int(column[7:]))
    return present + curve + probes


def summary_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per (regularizer, k, coefficient): ``variant``, ``n_seeds`` and ``<figure>_mean/_ci_low/_ci_high`` over seeds."""
    rows = []
    columns = figure_columns(seeds)
    for (regularizer, k, coefficient), group in seeds.groupby(KEYS, sort=True):
        row = {"regularizer": regularizer, "k": int(k), "coefficient": float(coefficient), "variant": group["variant"].iloc[0], "n_seeds": int(group["seed"].nunique())}
        for column in columns:
            interval = mean_with_interval(group[column].to_numpy(dtype=float))
            row[f"{column}_mean"], row[f"{column}_ci_low"], row[f"{column}_ci_high"] = interval["mean"], interval["ci_low"], interval["ci_high"]
        rows.append(row)
    order = list(dict.fromkeys(seeds["regularizer"]))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    numeric = [column for column in table.columns if column.endswith(("_mean", "_ci_low", "_ci_high"))]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")  # a missing interval (one seed) is NaN
    return table.sort_values(["regularizer", "k", "coefficient"], key=lambda c: c.map(order.index) if c.name == "regularizer" else c, kind="stable").reset_index(drop=True)


def _difference(base: pd.Series, other: pd.Series) -> dict[str, Any] | None:
    base, other = base.dropna().to_numpy(dtype=float), other.dropna().to_numpy(dtype=float)
    if base.size < 2 or other.size < 2:
        return None
    difference, low, high = reconstruction_cost_interval(base, other)
    return {"difference": difference, "ci_low": low, "ci_high": high}


def harmless_summary(seeds: pd.DataFrame) -> dict[str, Any]:
    """Per regularizer and training k: the largest harmless coefficient and the differences against 0 there.

    A ``message`` replaces the figures when coefficient 0 is missing at that k or a coefficient has fewer than
    two seeds with an FVU (the rule needs a seed-to-seed spread).
    """
    summary: dict[str, Any] = {}
    for regularizer in dict.fromkeys(seeds["regularizer"]):
        per_k = {}
        for k, group in seeds[seeds["regularizer"] == regularizer].groupby("k", sort=True):
            fvu = {float(c): rows["fvu"].dropna().tolist() for c, rows in group.groupby("coefficient", sort=True)}
            coefficients = sorted(fvu)
            entry: dict[str, Any] = {"coefficients": coefficients, "seeds_per_coefficient": {f"{c:g}": len(v) for c, v in fvu.items()}}
            if 0.0 not in fvu:
                per_k[str(int(k))] = {**entry, "message": "no coefficient-0 (unregularized) variant at this k"}
                continue
            if min(len(values) for values in fvu.values()) < 2:
                per_k[str(int(k))] = {**entry, "message": "fewer than two evaluated seeds for some coefficient (set evaluate.seeds: all and train.seeds with at least two)"}
                continue
            largest = largest_harmless_coefficient(fvu)
            harmful = [c for c in coefficients if c > largest]
            entry.update({"largest_harmless_coefficient": largest, "first_harmful_coefficient": harmful[0] if harmful else None})
            base = group[group["coefficient"] == 0.0]
            at = group[group["coefficient"] == largest]
            entry["fvu_cost"] = _difference(base["fvu"], at["fvu"])
            entry["gains"] = {figure: _difference(base[figure], at[figure]) for figure in GAIN_FIGURES if figure in group.columns and group[figure].notna().any()}
            curve = sorted((column for column in group.columns if column.startswith("fvu_x") and column != "fvu_x1"), key=lambda column: float(column[5:]))
            entry["k_robustness"] = {column: _difference(base[column], at[column]) for column in curve}
            per_k[str(int(k))] = entry
        summary[regularizer] = per_k
    return summary


_LABELS = {
    "fvu": "FVU", "ce_loss_recovered": "CE-loss recovered", "effective_latents": "effective latents/token", "top_token_mass_share": "top-token mass share",
    "token_entropy_bits": "token entropy (bits)", "embedding_similarity": "embedding similarity", "l0": "L0", "never_fired_on_eval_fraction": "never fired on the evaluate tokens",
}


def _label(column: str) -> str:
    if column.startswith("fvu_x"):
        return f"FVU at k'={column[5:]}k"
    if column.startswith("probe_m"):
        return f"probe m={column[7:]}"
    return _LABELS.get(column, column)


def _gain_text(name: str, difference: Mapping[str, Any] | None, digits: int = 4) -> str:
    if difference is None:
        return f"{name} n/a"
    return f"{name} {difference['difference']:+.{digits}f} [{difference['ci_low']:+.{digits}f}, {difference['ci_high']:+.{digits}f}]"


def markdown_section(table: pd.DataFrame, summary: Mapping[str, Any]) -> str:
    """The claim-4 sweep section of the results summary (markdown)."""
    lines = ["## Claim 4, regularizer strength sweep (`lm/claim4/`)\n"]
    if table.empty:
        return "\n".join(lines + ["No sweep outputs.\n"])
    lines.append(
        "Seed means with normal 95% intervals over seeds (coefficient 0 = the unregularized variant). A coefficient is "
        "*harmless* while the lower end of the Welch 95% interval of its FVU increase over coefficient 0 is <= 0; the "
        "largest harmless one is the end of that run of coefficients, walking upwards. Differences are coefficient minus 0. "
        "Higher top-token mass share and embedding similarity, lower token entropy mean more monosemantic; lower FVU at k' "
        "means more robust to the inference k.\n"
    )
    shown = [c for c in ("fvu", "ce_loss_recovered", "effective_latents", "top_token_mass_share", "token_entropy_bits", "embedding_similarity") if f"{c}_mean" in table.columns]
    shown += [c[:-5] for c in table.columns if c.endswith("_mean") and (c.startswith("fvu_x") or c.startswith("probe_m")) and c != "fvu_x1_mean"]
    for regularizer, rows in table.groupby("regularizer", sort=False):
        lines.append(f"### {regularizer}\n")
        body = [[int(row["k"]), f"{row['coefficient']:g}", int(row["n_seeds"])] + [format_interval(row[f"{c}_mean"], row[f"{c}_ci_low"], row[f"{c}_ci_high"], 4) for c in shown]
                for _, row in rows.iterrows()]
        lines.append(markdown_table(["k", "coefficient", "seeds"] + [_label(c) for c in shown], body))
        for k, entry in summary.get(regularizer, {}).items():
            if "message" in entry:
                lines.append(f"- k={k}: {entry['message']}\n")
                continue
            largest = entry["largest_harmless_coefficient"]
            harmful = entry["first_harmful_coefficient"]
            after = f"; the first harmful one is {harmful:g}" if harmful is not None else "; none of the swept coefficients is harmful"
            if largest == 0:
                lines.append(f"- k={k}: no non-zero coefficient is harmless (the smallest, {entry['coefficients'][1]:g}, already raises FVU beyond seed noise){after}.\n")
                continue
            gains = "; ".join(_gain_text(_label(name), value) for name, value in entry["gains"].items())
            robust = "; ".join(_gain_text(_label(name), value) for name, value in entry["k_robustness"].items())
            lines.append(f"- k={k}: largest harmless coefficient **{largest:g}** ({_gain_text('FVU cost', entry['fvu_cost'])}){after}. "
                         f"At {largest:g} against 0: {gains}. k-robustness: {robust}.\n")
        lines.append("")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def run_claim4(
    layout: Mapping[str, Sequence[Mapping[str, Any]]],
    outputs: Mapping[str, str],
    plots: Mapping[str, Mapping[str, str]],
    budgets: Sequence[int] = (1, 2, 5),
) -> dict[str, Any]:
    """Read the sweep's evaluate outputs and write the claim-4 tables, summary, markdown and figures.

    Args:
        layout: ``Experiment.claim4_inputs()``: per regularizer, entries ``{variant, k, coefficient, condition,
            seeds: {seed: {metrics, k_robustness, probing}}}``.
        outputs: paths for ``table``, ``seeds``, ``k_robustness``, ``probing`` (CSV), ``summary`` (JSON), ``markdown``.
        plots: per regularizer, ``{tradeoff, k_robustness, probing}`` PNG paths.
        budgets: the probing budgets drawn (those evaluated among them).

    Returns:
        The summary written to ``outputs["summary"]``.
    """
    seeds, robustness, probing = load_seed_rows(layout)
    table = summary_table(seeds)
    summary = harmless_summary(seeds)
    logger.info("claim 4: %d seed rows over %d (regularizer, k, coefficient) points", len(seeds), len(table))
    write_dataframe(outputs["seeds"], seeds)
    write_dataframe(outputs["table"], table)
    write_dataframe(outputs["k_robustness"], robustness if not robustness.empty else pd.DataFrame(columns=KEYS + ["seed", "multiplier", "fvu"]))
    write_dataframe(outputs["probing"], probing if not probing.empty else pd.DataFrame(columns=KEYS + ["seed", "property", "m", "test_balanced_accuracy"]))
    for regularizer, paths in plots.items():
        rows = table[table["regularizer"] == regularizer] if not table.empty else table
        plot_tradeoff(paths["tradeoff"], rows, regularizer)
        plot_k_robustness_sweep(paths["k_robustness"], rows, regularizer)
        plot_probing_sweep(paths["probing"], rows, regularizer, budgets)
    written = _json_safe({"regularizers": summary, "seeds": sorted(int(seed) for seed in seeds["seed"].unique()) if not seeds.empty else []})
    write_json(outputs["summary"], written)
    write_text(outputs["markdown"], markdown_section(table, summary))
    return written
