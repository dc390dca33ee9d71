"""Names and paths of the experiment (sae_pipeline.layout): built from settings and parsed back in one place."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sae_pipeline.layout import (
    Condition,
    Experiment,
    ResultsLayout,
    expand_variants,
    input_files,
    reference_condition,
    seed_group_label,
    seed_groups,
    variant_name,
)
from tests.conftest import tiny_experiment_config


def default_config() -> dict:
    """The tiny experiment: one architecture (topk, k 16) and two weight-penalty conditions."""
    return tiny_experiment_config()


@pytest.mark.parametrize(
    "settings, label",
    [
        ({"weight_penalty": {"kind": "l2", "coefficient": 0.0}, "regularizer": {"kind": "none"}}, "l2w0+noreg"),
        ({"weight_penalty": {"kind": "l2", "coefficient": 1e-3}, "regularizer": {"kind": "none"}}, "l2w1e-03+noreg"),
        ({"weight_penalty": {"kind": "none"}, "regularizer": {"kind": "none"}}, "nopen+noreg"),
        ({"weight_penalty": {"kind": "l1", "coefficient": 3e-4}}, "l1w3e-04+noreg"),
        ({"weight_penalty": {"kind": "l2", "coefficient": 0.0}, "regularizer": {"kind": "off_support_l1", "coefficient": 1e-3}}, "l2w0+off_support_l11e-03"),
        ({"weight_penalty": {"kind": "l2", "coefficient": 1.5e-4}, "regularizer": {"kind": "l1_l2_ratio", "coefficient": 0.01}}, "l2w0.00015+l1_l2_ratio1e-02"),
        ({}, "nopen+noreg"),
    ],
)
def test_condition_labels_round_trip(settings, label):
    condition = Condition.of_settings(settings)
    assert condition.label == label
    assert Condition.parse(label) == condition


def test_unregularized_is_a_property_of_the_condition():
    assert Condition.parse("l2w0+noreg").is_unregularized and Condition.parse("nopen+noreg").is_unregularized
    assert not Condition.parse("l2w1e-03+noreg").is_unregularized
    assert not Condition.parse("l2w0+off_support_l11e-03").is_unregularized
    assert reference_condition(["l2w1e-03+noreg", "l2w0+l1_l2_ratio1e-02", "l2w0+noreg"]) == "l2w0+noreg"


@pytest.mark.parametrize("label", ["l2w0", "l3w0+noreg", "l2wx+noreg", "l2w0+ridge1e-03", "nopen+off_support_l1abc"])
def test_bad_condition_labels_are_refused(label):
    with pytest.raises(ValueError, match="condition|not a condition label"):
        Condition.parse(label)


def test_variant_names_and_order_do_not_depend_on_the_order_of_grid_keys():
    train = default_config()["train"]
    shuffled = copy.deepcopy(train)
    shuffled["grid"] = dict(reversed(list(train["grid"].items())))
    assert list(expand_variants(shuffled)) == list(expand_variants(train))
    assert list(expand_variants(train))[0] == "topk-k16-l2w0-noreg"
    assert variant_name({"k": 16, "architecture": "topk"}) == variant_name({"architecture": "topk", "k": 16}) == "topk-k16"


def test_seed_groups_and_labels():
    assert seed_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert seed_group_label([0, 1, 2]) == "seeds0-1-2"
    experiment = Experiment(default_config())
    assert experiment.group_of("lm", 2) == "seeds0-1-2"
    with pytest.raises(ValueError, match="seed 9 is not in lm train.seeds"):
        experiment.group_of("lm", 9)


def test_every_stage_path_comes_from_the_layout():
    layout = ResultsLayout("R")
    assert layout.sae_dir("lm", "v", "seeds0-1", 1) == "R/lm/sae/v/seeds0-1/seed1"
    assert layout.match_file("digits", "v", "features") == "R/digits/match/v/features.parquet"
    assert layout.autointerp_file("v", 0, "scores") == "R/lm/autointerp/v/seed0/scores.parquet"
    assert layout.evaluate_file("{variant}", "{seed}", "metrics") == "R/lm/evaluate/{variant}/seed{seed}/metrics.json"
    assert layout.regress_file("plot_probing") == "R/lm/regress/plots/probing.png"
    assert layout.log("train", "lm", "v", "seeds0-1-2") == "R/logs/train/lm/v/seeds0-1-2.log"
    assert layout.judge_cache("{results_dir}/.judge_cache") == "R/.judge_cache"


def test_regress_inputs_name_each_variants_outputs():
    config = default_config()
    config["results_dir"] = "R"
    inputs = Experiment(config).regress_inputs()
    first = inputs["topk-k16-l2w0-noreg"]
    assert first["condition"] == "l2w0+noreg"
    assert first["steer_rows"] == "R/lm/steer/topk-k16-l2w0-noreg/seed0/rows.parquet"
    assert first["training_curves"] == ["R/lm/sae/topk-k16-l2w0-noreg/seeds0-1-2/curves.parquet"]
    files = input_files(inputs)
    assert "R/lm/sae/topk-k16-l2w0-noreg/seeds0-1-2" in files and not any(Path(path).name == "curves.parquet" for path in files)


def test_a_configfile_overriding_one_grid_axis_keeps_the_names():
    """Snakemake starts from the --configfile values, merges the Snakefile's configfile into them and the
    override on top again (snakemake.utils.update_config): an overridden grid axis comes first."""
    from snakemake.utils import update_config

    config = default_config()
    override = {"train": {"grid": {"k": list(config["train"]["grid"]["k"])}}}
    overridden = copy.deepcopy(override)
    update_config(overridden, copy.deepcopy(config))
    update_config(overridden, override)
    assert next(iter(overridden["train"]["grid"])) == "k" != next(iter(config["train"]["grid"]))
    assert list(Experiment(overridden).variants("lm")) == list(Experiment(config).variants("lm"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"k": 2048, "d_sae": 1024}, "k=2048 exceeds d_sae=1024"),
    ],
)
def test_cross_field_training_settings_are_checked_at_dag_build(options, message):
    config = default_config()
    for key, value in options.items():
        if key in config["train"]["grid"]:
            config["train"]["grid"][key] = [value]
        else:
            config["train"]["options"][key] = value
    with pytest.raises(ValueError, match=message) as error:
        Experiment(config).check_settings()
    assert "variant 'topk-k" in str(error.value)


def test_matryoshka_prefixes_past_d_sae_are_refused_at_dag_build():
    config = default_config()
    config["train"]["grid"]["architecture"] = ["matryoshka_batchtopk"]
    config["train"]["options"].update({"d_sae": 256, "matryoshka_prefixes": [128, 512]})
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        Experiment(config).check_settings()


def test_a_hook_past_the_local_models_last_block_is_refused():
    config = default_config()
    assert config["subject_model"]["source"] == "train_local"
    config["subject_model"]["hook_name"] = f"blocks.{config['subject_model']['train']['n_layers']}.hook_resid_post"
    with pytest.raises(ValueError, match="subject_model: hook_name 'blocks.4.hook_resid_post' names block 4"):
        Experiment(config).check_settings()
    config["subject_model"]["hook_name"] = "resid_post_2"
    with pytest.raises(ValueError, match="blocks.<i>.hook_<name>"):
        Experiment(config).check_settings()
    Experiment(default_config()).check_settings()
