"""Config keys: defaults, precedence, derived dimensions and every validation error."""

from __future__ import annotations

import pytest
import yaml

from collective_model import config as C


def test_defaults_are_valid():
    assert C.validate(dict(C.DEFAULTS)) == C.resolve()


def test_every_key_has_help_and_range():
    for key in C.KEYS.values():
        assert key.help
        assert key.describe_range()


def test_reference_config_derived_dimensions():
    dims = C.derive_dimensions(C.resolve())
    assert dims["n_experts"] == 2  # round(8 * 0.2) = round(1.6) = 2
    assert dims["n_analysts"] == 6
    assert dims["expert_encoder_dim"] == 64  # int(2 * 128 * 0.25)
    assert dims["analyst_input_dim"] == 784 + 64
    assert dims["collective_input_dim"] == 229  # int(64 * (1 + log2 6)) = int(229.42)
    assert dims["head_hidden_dim"] == 229  # max(int(229 * 1.0), 20)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"n_total": 10, "expert_ratio": 0.1}, 2),  # round(1.0) = 1, raised to the minimum of 2
        ({"n_total": 10, "expert_ratio": 0.95}, 9),  # round(9.5) = 10 (half to even), capped at n_total - 1
        ({"n_total": 5, "expert_ratio": 0.5}, 2),  # round(2.5) = 2 (half to even)
        ({"n_total": 6, "n_experts": 4}, 4),
    ],
)
def test_n_experts_derivation(overrides, expected):
    assert C.derive_dimensions(C.resolve(set_values=overrides))["n_experts"] == expected


def test_collective_input_dim_clamps_then_scales():
    # int(16 * (1 + log2 2)) = 32 is clamped up to 64, then scaled by 0.5.
    assert C.collective_input_dim(16, 2, 0.5) == 32
    # int(1024 * (1 + log2 8)) = 4096 is clamped down to 2048.
    assert C.collective_input_dim(1024, 8, 1.0) == 2048
    assert C.collective_input_dim(1, 1, 0.001) == 1


def test_encoder_head_dimensions():
    dims = C.derive_dimensions(C.resolve(set_values={"collective_version": "encoder_head", "head_compression": 0.5}))
    assert dims["head_input_dim"] == 114  # max(int(229 * 0.5), 20)
    assert dims["head_hidden_dim"] == 114


def test_member_variants():
    assert C.member_variant([512, 256], 5, True) == [640, 320]  # 5 mod 4 = 1: wider
    assert C.member_variant([512, 256], 6, True) == [512, 384, 256]  # deeper
    assert C.member_variant([512, 256], 7, True) == [409, 204]  # narrower
    assert C.member_variant([512, 256], 7, False) == [512, 256]


# --------------------------------------------------------------------------------------------
# Precedence: defaults < file < --set < sweep parameters
# --------------------------------------------------------------------------------------------


def test_precedence_of_sources():
    resolved = C.resolve(
        file_values={"learning_rate": 0.01, "epochs": 3, "batch_size": 64},
        set_values={"learning_rate": 0.02, "epochs": 4},
        sweep_values={"learning_rate": 0.03},
    )
    assert resolved["learning_rate"] == 0.03
    assert resolved["epochs"] == 4
    assert resolved["batch_size"] == 64
    assert resolved["optimizer"] == C.DEFAULTS["optimizer"]


def test_set_values_parse_as_yaml():
    values = C.parse_set_options(["expert_hidden=[512,256]", "use_augmentation=false", "learning_rate=1e-3", "n_experts=null"])
    assert values == {"expert_hidden": [512, 256], "use_augmentation": False, "learning_rate": 1e-3, "n_experts": None}
    assert type(values["expert_hidden"]) is list


def test_only_true_and_false_are_booleans():
    values = C.parse_set_options(["a=False", "b=true", "c=yes", "d=off", 'e="false"'])
    assert values == {"a": False, "b": True, "c": "yes", "d": "off", "e": "false"}


def test_set_without_equals_is_rejected():
    with pytest.raises(C.ConfigError, match="expected key=value"):
        C.parse_set_options(["epochs"])


def test_sweep_params_file_format(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("wandb_version: 1\n\nlearning_rate:\n  value: 0.005\nexpert_hidden:\n  value:\n  - 384\n  - 192\n  - 96\n")
    assert C.load_sweep_params(path) == {"learning_rate": 0.005, "expert_hidden": [384, 192, 96]}


def test_config_file_must_be_flat_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_total: 8\n")
    with pytest.raises(C.ConfigError, match="key 'model' contains a nested mapping"):
        C.load_config_file(path)


def test_config_file_missing():
    with pytest.raises(C.ConfigError, match="config file not found: /no/such.yaml"):
        C.load_config_file("/no/such.yaml")


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


def test_unknown_key_suggests_closest():
    with pytest.raises(C.ConfigError) as info:
        C.resolve(file_values={"learning_rat": 0.01})
    message = str(info.value)
    assert "unknown key 'learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_key_without_close_match():
    with pytest.raises(C.ConfigError, match="unknown key 'zzzz' in --set; run 'collective train --print-config'"):
        C.resolve(set_values={"zzzz": 1})


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("use_augmentation", "False", "use_augmentation: invalid value 'False' (str); expected true or false"),
        ("use_drop_models", 1, "use_drop_models: invalid value 1 (int); expected true or false"),
        ("epochs", 2.5, "epochs: invalid value 2.5 (float); expected an integer >= 1"),
        ("epochs", True, "epochs: invalid value True (bool)"),
        ("epochs", 0, "epochs: invalid value 0 (int); expected an integer >= 1"),
        ("learning_rate", 0, "learning_rate: invalid value 0 (int); expected a number > 0 and <= 10"),
        ("learning_rate", "fast", "learning_rate: invalid value 'fast' (str)"),
        ("member_dropout", 1.0, "member_dropout: invalid value 1.0 (float); expected a number >= 0 and < 1"),
        ("expert_hidden", [], "expert_hidden: invalid value [] (list); expected a non-empty list of positive integers"),
        ("expert_hidden", [512], "with at least 2 entries"),
        ("expert_hidden", [512, 0], "expert_hidden: invalid value [512, 0]"),
        ("expert_hidden", [512, "256"], "expert_hidden: invalid value [512, '256']"),
        ("expert_hidden", "512,256", "expert_hidden: invalid value '512,256' (str)"),
        ("expert_hidden", [512, True], "expert_hidden: invalid value [512, True]"),
        ("optimizer", "rmsprop", "optimizer: invalid value 'rmsprop' (str); expected one of adam, adamw, sgd"),
        ("dataset", "imagenet", "expected one of fashion_mnist, mnist, cifar10"),
        ("n_experts", 1, "n_experts: invalid value 1 (int); expected null or an integer >= 2"),
        ("learning_rate", float("nan"), "learning_rate: invalid value nan"),
    ],
)
def test_invalid_values_name_key_value_and_range(key, value, fragment):
    with pytest.raises(C.ConfigError) as info:
        C.resolve(set_values={key: value})
    assert fragment in str(info.value)


def test_all_problems_reported_together():
    with pytest.raises(C.ConfigError) as info:
        C.resolve(set_values={"epochs": 0, "optimizer": "x", "use_augmentation": "yes"})
    assert len(info.value.problems) == 3


def test_n_experts_beyond_members_is_rejected():
    with pytest.raises(C.ConfigError, match="n_experts: n_experts gives 8 experts, but 8 members allow 2 to 7"):
        C.resolve(set_values={"n_experts": 8})


def test_min_dim_above_max_dim_is_rejected():
    with pytest.raises(C.ConfigError, match="collective_min_dim: 512 is larger than collective_max_dim 256"):
        C.resolve(set_values={"collective_min_dim": 512, "collective_max_dim": 256})


def test_to_yaml_round_trips():
    resolved = C.resolve()
    text = C.to_yaml(resolved, C.derive_dimensions(resolved))
    loaded = yaml.safe_load(text)
    derived = loaded.pop("derived")
    assert loaded == resolved
    assert derived["collective_input_dim"] == 229


def test_configuration_doc_matches_keys():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == C.keys_markdown(), "regenerate with: python -m collective_model.config > docs/configuration.md"
