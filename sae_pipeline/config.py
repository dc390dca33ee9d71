"""Settings shared by the Snakefile and the stage modules: the SAE variant grid and small helpers.

The Snakefile calls :func:`expand_variants` at DAG-build time to turn a config's ``grid`` (a product
over named axes) plus ``extra_variants`` into named variants; the same function names the folders the
stages write, so every stage agrees on what a variant is called.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any, Mapping

# Axis values are turned into short, filesystem-safe name parts in this order.
_BOOLEAN_ABBREVIATIONS = {"tied_init": "tied", "unit_norm_decoder": "unit"}


def format_coefficient(value: float) -> str:
    """A compact, filesystem-safe rendering of a coefficient: ``0`` -> ``"0"``, ``1e-4`` -> ``"1e-04"``."""
    value = float(value)
    if value == 0:
        return "0"
    text = f"{value:.0e}" if float(f"{value:.0e}") == value else f"{value:.3g}"
    return text.replace("+", "")


def _name_part(axis: str, value: Any) -> str:
    if axis == "architecture":
        return str(value)
    if axis == "k":
        return f"k{value}"
    if axis == "weight_penalty":
        if value["kind"] == "none" or float(value.get("coefficient", 0)) == 0:
            return f"{value['kind']}w0" if value["kind"] != "none" else "nopen"
        return f"{value['kind']}w{format_coefficient(value['coefficient'])}"
    if axis == "regularizer":
        if value["kind"] == "none":
            return "noreg"
        return f"{value['kind']}{format_coefficient(value['coefficient'])}"
    if isinstance(value, bool):
        return f"{_BOOLEAN_ABBREVIATIONS.get(axis, axis)}{int(value)}"
    return f"{axis}{value}"


def variant_name(axes: Mapping[str, Any]) -> str:
    """Name of a variant from its grid-axis values, e.g. ``topk-k16-l2w1e-04-noreg``."""
    return "-".join(_name_part(axis, value) for axis, value in axes.items())


def condition_label(settings: Mapping[str, Any]) -> str:
    """The regularization condition of a variant (weight penalty and sparsity regularizer), e.g. ``l2w1e-04+noreg``.

    This is the factor the regress stage compares; it ignores architecture, k and seed.
    """
    penalty = _name_part("weight_penalty", settings.get("weight_penalty", {"kind": "none", "coefficient": 0}))
    regularizer = _name_part("regularizer", settings.get("regularizer", {"kind": "none", "coefficient": 0}))
    return f"{penalty}+{regularizer}"


def expand_variants(train_section: Mapping[str, Any]) -> "OrderedDict[str, dict[str, Any]]":
    """Expand ``grid`` (product over axes) and ``extra_variants`` into ``{name: settings}``.

    ``settings`` is ``options`` overlaid with the variant's axis values; every axis in ``grid`` and
    every key of an extra variant also appears in the name, so two variants never share a folder.

    Raises:
        ValueError: if two variants would get the same name.
    """
    options = dict(train_section.get("options", {}))
    grid = train_section.get("grid", {}) or {}
    variants: "OrderedDict[str, dict[str, Any]]" = OrderedDict()

    def add(axes: "OrderedDict[str, Any]") -> None:
        name = variant_name(axes)
        if name in variants:
            raise ValueError(f"train: two variants are both named {name!r}; make grid/extra_variants distinct")
        settings = copy.deepcopy(options)
        settings.update(copy.deepcopy(dict(axes)))
        variants[name] = settings

    axis_names = list(grid.keys())
    if axis_names:
        for values in itertools.product(*(grid[axis] for axis in axis_names)):
            add(OrderedDict(zip(axis_names, values)))
    for extra in train_section.get("extra_variants", []) or []:
        ordered = OrderedDict((axis, extra[axis]) for axis in axis_names if axis in extra)
        ordered.update((key, value) for key, value in extra.items() if key not in ordered)
        add(ordered)
    return variants


def seed_groups(seeds: list[int], seeds_per_job: int) -> list[list[int]]:
    """Split ``seeds`` into consecutive groups of at most ``seeds_per_job`` (one training job each)."""
    if seeds_per_job < 1:
        raise ValueError("train.seeds_per_job must be at least 1")
    return [list(seeds[start : start + seeds_per_job]) for start in range(0, len(seeds), seeds_per_job)]


def seed_group_label(group: list[int]) -> str:
    """Folder label of a seed group, e.g. ``seeds0-1-2``."""
    return "seeds" + "-".join(str(seed) for seed in group)


def resolve_device(requested: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as is."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
