"""Config validation: the default and paper configs pass; a wrong type, an unknown key or a missing
required key is rejected with the key named."""

from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tests.conftest import REPO_ROOT, merge_configs

SCHEMA = str(REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")


def load(path: str) -> dict:
    return yaml.safe_load((REPO_ROOT / path).read_text())


def rejection_message(config: dict) -> str:
    with pytest.raises(WorkflowError) as error:
        validate(config, SCHEMA)
    return str(error.value)


@pytest.mark.parametrize("path", ["config.yaml", "workflow/configs/paper.yaml", "workflow/configs/tiny.yaml"])
def test_shipped_configs_validate(path):
    config = load("config.yaml")
    if path != "config.yaml":
        config = merge_configs(config, load(path))
    validate(copy.deepcopy(config), SCHEMA)


def test_wrong_type_names_the_key():
    config = load("config.yaml")
    config["cache"]["max_tokens"] = "lots"
    message = rejection_message(config)
    assert "max_tokens" in message and "'lots' is not of type 'integer'" in message


def test_unknown_key_is_named():
    config = load("config.yaml")
    config["cache"]["rows_per_shart"] = 10
    assert "rows_per_shart" in rejection_message(config)


def test_unknown_top_level_section_is_named():
    config = load("config.yaml")
    config["trian"] = {}
    assert "trian" in rejection_message(config)


def test_missing_required_key_is_named():
    config = load("config.yaml")
    del config["cache"]["dtype"]
    assert "'dtype' is a required property" in rejection_message(config)


def test_bad_enum_value_is_named():
    config = load("config.yaml")
    config["cache"]["dtype"] = "bfloat17"
    message = rejection_message(config)
    assert "bfloat17" in message and "dtype" in message


def test_every_top_level_section_is_required():
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert sorted(schema["required"]) == sorted(schema["properties"])


@pytest.mark.parametrize("section", ["steer", "autointerp", "lm_judge"])
def test_a_missing_section_is_named_at_validation(section):
    config = load("config.yaml")
    del config[section]
    assert f"'{section}' is a required property" in rejection_message(config)


def _nodes(node, path=""):
    """Every (path, mapping) in a parsed schema."""
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from _nodes(child, f"{path}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _nodes(child, f"{path}[{index}]")


@pytest.mark.parametrize("schema_file", sorted(path.name for path in (REPO_ROOT / "workflow" / "schemas").glob("*.yaml")))
def test_schema_descriptions_are_whole(schema_file):
    """An unquoted comma in a flow-mapping description splits it into a cut description plus a junk key with a null
    value (``'BOS positions included': None``); the only null values a schema holds are defaults."""
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / schema_file).read_text())
    junk = [f"{path}/{key}" for path, node in _nodes(schema) for key, value in node.items() if value is None and key != "default"]
    assert junk == []
    cache = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "cache.schema.yaml").read_text())
    assert cache["properties"]["max_tokens"]["description"] == "tokens to cache, BOS positions included"
