"""Typed settings: schemas and dataclasses describe the same keys, enumerations are defined once."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from sae_pipeline import settings as settings_module
from sae_pipeline.settings import (
    SCHEMA_ENUMS,
    AutointerpSettings,
    BrowserSettings,
    CacheSettings,
    CorpusSettings,
    DigitsDataSettings,
    EvaluateSettings,
    LikelihoodJudgeSettings,
    MatchSettings,
    RegressSettings,
    Settings,
    SteerSettings,
    SubjectModelSettings,
    TrainSettings,
)
from tests.conftest import REPO_ROOT

SCHEMAS = REPO_ROOT / "workflow" / "schemas"
SECTION_CLASSES = {
    "corpus": (CorpusSettings, "corpus.schema.yaml", ""),
    "subject_model": (SubjectModelSettings, "subject_model.schema.yaml", ""),
    "cache": (CacheSettings, "cache.schema.yaml", ""),
    "match": (MatchSettings, "match.schema.yaml", ""),
    "autointerp": (AutointerpSettings, "autointerp.schema.yaml", ""),
    "steer": (SteerSettings, "steer.schema.yaml", ""),
    "evaluate": (EvaluateSettings, "evaluate.schema.yaml", ""),
    "regress": (RegressSettings, "regress.schema.yaml", ""),
    "lm_judge": (LikelihoodJudgeSettings, "lm_judge.schema.yaml", ""),
    "browser": (BrowserSettings, "browser.schema.yaml", ""),
    "digits.data": (DigitsDataSettings, "digits.schema.yaml", "properties/data"),
    "train.options": (TrainSettings, "train.schema.yaml", "$defs/variant_settings"),
}


def schema(name: str) -> dict:
    return yaml.safe_load((SCHEMAS / name).read_text())


def at(node: dict, path: str) -> dict:
    for part in filter(None, path.split("/")):
        node = node[part]
    return node


def all_enums(node, path=""):
    """``{path: enum}`` of every enum in a schema tree."""
    found = {}
    if isinstance(node, dict):
        if "enum" in node:
            found[path.strip("/")] = node["enum"]
        for key, value in node.items():
            if key != "enum":
                found.update(all_enums(value, f"{path}/{key}"))
    return found


def test_every_schema_enum_equals_the_settings_enumeration():
    listed = {(file, path) for file, path in SCHEMA_ENUMS}
    for file in sorted(path.name for path in SCHEMAS.glob("*.schema.yaml")):
        for path, values in all_enums(schema(file)).items():
            assert (file, path) in listed, f"{file}: enum at {path} is not in settings.SCHEMA_ENUMS"
            assert list(values) == list(SCHEMA_ENUMS[(file, path)]), f"{file}:{path}"
    for file, path in listed:
        assert "enum" in at(schema(file), path), f"SCHEMA_ENUMS names {file}:{path}, which has no enum"


def _field_names(cls) -> set[str]:
    return {item.name for item in dataclasses.fields(cls)}


@pytest.mark.parametrize("section", sorted(SECTION_CLASSES))
def test_schema_properties_and_dataclass_fields_are_the_same_keys(section):
    cls, file, path = SECTION_CLASSES[section]
    node = at(schema(file), path)
    assert set(node["properties"]) == _field_names(cls)
    hints = typing.get_type_hints(cls)
    for name, child in node["properties"].items():
        if child.get("type") == "object" and "properties" in child:
            assert isinstance(hints[name], type) and issubclass(hints[name], Settings), f"{section}.{name} should be nested settings"
            assert set(child["properties"]) == _field_names(hints[name]), f"{section}.{name}"


def test_the_default_config_builds_every_section():
    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    for section, (cls, _, _) in SECTION_CLASSES.items():
        if section == "train.options":
            values = config["train"]["options"]
        elif section == "digits.data":
            values = config["digits"]["data"]
        else:
            values = config.get(section, {})
        built = cls.from_mapping(values)
        plain = built.as_dict()
        for key, value in values.items():  # what the config says survives, as plain values
            expected = value if not isinstance(value, list) else list(value)
            assert plain[key] == expected, f"{section}.{key}"


def test_unknown_keys_are_named_with_their_section():
    with pytest.raises(ValueError, match=r"autointerp\.mining\.windw_before"):
        AutointerpSettings.from_mapping({"mining": {"windw_before": 3}})
    with pytest.raises(ValueError, match=r"steer\.strenght_mode"):
        SteerSettings.from_mapping({"strenght_mode": "fixed"})


def test_nested_sections_become_dataclasses_and_lists_tuples():
    built = AutointerpSettings.from_mapping({"features": {"selection": "category", "categories": ["always"]}, "mining": {"n_top": 3}})
    assert built.features.categories == ("always",) and built.mining.n_top == 3 and built.mining.window == 12 + 1 + 4
    assert AutointerpSettings.from_mapping(built) is built


def test_train_settings_check_their_choices():
    with pytest.raises(ValueError, match="train: sparse_decoder must be one of"):
        TrainSettings.from_mapping({"sparse_decoder": "fast"})
    with pytest.raises(ValueError, match="k=50 exceeds d_sae=32"):
        TrainSettings.from_mapping({"k": 50, "d_sae": 32})
    assert TrainSettings.from_mapping({"weight_penalty": {"kind": "l2"}}).weight_penalty == {"coefficient": 0.0, "kind": "l2"}


def test_enumerations_are_tuples_defined_once():
    names = [name for name in dir(settings_module) if name.isupper() and isinstance(getattr(settings_module, name), tuple)]
    assert {"ARCHITECTURES", "STRENGTH_MODES", "PENALTY_KINDS", "REGULARIZER_KINDS"} <= set(names)
    for path in (REPO_ROOT / "sae_pipeline").rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        for literal in ('("fixed", "resid_rms", "target_rise")', '("topk", "batchtopk"', '("none", "off_support_l1", "l1_l2_ratio")'):
            assert literal not in text, f"{path} redefines an enumeration of settings.py"


@pytest.mark.parametrize(
    "mode, kept, dropped",
    [
        ("resid_rms", {"strength_multiple"}, {"fixed_strength", "target_rise"}),
        ("fixed", {"fixed_strength"}, {"strength_multiple", "target_rise"}),
        ("target_rise", {"target_rise", "fixed_strength"}, {"strength_multiple"}),
    ],
)
def test_steer_params_carry_only_the_active_strength_modes_settings(mode, kept, dropped):
    section = {**yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["steer"], "strength_mode": mode}
    active = settings_module.active_strength_settings(section)
    assert kept <= set(active) and not dropped & set(active)
    assert set(section) - set(active) == dropped
    changed = settings_module.active_strength_settings({**section, **{key: 123.0 for key in dropped}})
    assert changed == active


def test_steer_rule_params_use_the_active_strength_settings():
    rule = (REPO_ROOT / "workflow" / "rules" / "steer.smk").read_text()
    assert "settings=active_strength_settings(config[\"steer\"])" in rule
