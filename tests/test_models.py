"""The Collective Model: parameter counts by hand, diversity loss, model-level dropout."""

from __future__ import annotations

import math

import pytest
import torch

from collective_model import config as C
from collective_model.models import CollectiveModel, diversity_loss, drop_members
from collective_model.reference import ReferenceCollectiveModel
from collective_model.training import per_100k, per_1m


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def batch_norm(width: int) -> int:
    return 2 * width  # weight and bias; running statistics are buffers, not parameters


def member(n_in: int, hidden: list[int], n_out: int) -> int:
    total, width = 0, n_in
    for h in hidden:
        total += linear(width, h) + batch_norm(h)
        width = h
    return total + linear(width, n_out)


def test_reference_config_parameter_count_by_hand():
    overrides = {
        "n_total": 8, "expert_ratio": 0.2, "expert_hidden": [512, 256], "expert_output": 128,
        "analyst_hidden": [256, 128], "analyst_output": 64, "c_expert": 0.25, "c_collective": 1.0,
        "collective_version": "simple_mlp",
    }
    model = CollectiveModel(C.resolve(set_values=overrides))

    # n_experts = round(8 * 0.2) = 2, n_analysts = 6.
    # Expert: 784*512+512 + 2*512 + 512*256+256 + 2*256 + 256*128+128 = 567,680.
    expert = (784 * 512 + 512) + 2 * 512 + (512 * 256 + 256) + 2 * 256 + (256 * 128 + 128)
    assert expert == 567_680
    # Expert encoder: 2*128 = 256 -> int(256 * 0.25) = 64: 256*64+64 + 2*64 = 16,576.
    expert_encoder = (256 * 64 + 64) + 2 * 64
    assert expert_encoder == 16_576
    # Analyst input 784 + 64 = 848: 848*256+256 + 2*256 + 256*128+128 + 2*128 + 128*64+64 = 259,264.
    analyst = (848 * 256 + 256) + 2 * 256 + (256 * 128 + 128) + 2 * 128 + (128 * 64 + 64)
    assert analyst == 259_264
    # collective_input_dim = int(64 * (1 + log2 6)) = int(229.42) = 229, within [64, 2048], * 1.0.
    # Analyst encoder: 6*64 = 384 -> 229: 384*229+229 + 2*229 = 88,623.
    analyst_encoder = (384 * 229 + 229) + 2 * 229
    assert analyst_encoder == 88_623
    # Head simple_mlp: hidden = max(int(229 * 1.0), 20) = 229: 229*229+229 + 229*10+10 = 54,970.
    head = (229 * 229 + 229) + (229 * 10 + 10)
    assert head == 54_970

    expected = 2 * expert + expert_encoder + 6 * analyst + analyst_encoder + head
    assert expected == 2_851_113
    assert model.num_parameters() == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_total": 3, "expert_hidden": [8, 4], "expert_output": 4, "analyst_hidden": [6, 5], "analyst_output": 3},
        {"n_total": 5, "n_experts": 3, "expert_hidden": [10, 6, 4], "expert_output": 5, "analyst_hidden": [7, 3],
         "analyst_output": 2, "c_expert": 0.5, "c_collective": 0.25, "collective_version": "encoder_head"},
    ],
)
def test_small_config_parameter_count(overrides):
    config = C.resolve(set_values=overrides)
    d = C.derive_dimensions(config)
    classes = d["num_classes"]
    expected = (
        d["n_experts"] * member(784, config["expert_hidden"], config["expert_output"])
        + linear(d["n_experts"] * config["expert_output"], d["expert_encoder_dim"]) + batch_norm(d["expert_encoder_dim"])
        + d["n_analysts"] * member(784 + d["expert_encoder_dim"], config["analyst_hidden"], config["analyst_output"])
        + linear(d["n_analysts"] * config["analyst_output"], d["collective_input_dim"]) + batch_norm(d["collective_input_dim"])
        + linear(d["head_input_dim"], d["head_hidden_dim"]) + linear(d["head_hidden_dim"], classes)
    )
    if config["collective_version"] == "encoder_head":
        expected += linear(d["collective_input_dim"], d["head_input_dim"]) + batch_norm(d["head_input_dim"])
    assert CollectiveModel(config).num_parameters() == expected


def test_first_small_config_dimensions_by_hand():
    d = C.derive_dimensions(C.resolve(set_values={"n_total": 3, "expert_output": 4, "analyst_output": 3}))
    assert (d["n_experts"], d["n_analysts"]) == (2, 1)  # round(0.6) = 1, raised to 2
    assert d["expert_encoder_dim"] == 2  # int(2 * 4 * 0.25)
    assert d["collective_input_dim"] == 64  # int(3 * (1 + 0)) = 3, clamped up to 64
    assert d["head_hidden_dim"] == 64


def test_varied_architectures_parameter_count():
    config = C.resolve(set_values={"n_total": 6, "n_experts": 2, "vary_expert_architectures": True,
                                   "vary_analyst_architectures": True, "expert_hidden": [40, 20], "analyst_hidden": [20, 10]})
    model = CollectiveModel(config)
    reference = ReferenceCollectiveModel(config)
    assert model.num_parameters() == reference.num_parameters()
    # Analysts 0..3 use base, wider, deeper, narrower widths.
    assert model.analysts.member_widths == [[20, 10], [25, 12], [20, 15, 10], [16, 8]]


# --------------------------------------------------------------------------------------------
# Diversity loss
# --------------------------------------------------------------------------------------------


def test_diversity_loss_known_vectors():
    # Two members, batch of two. Sample 0: same direction (cos 1); sample 1: opposite (cos -1).
    outputs = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, -1.0]]])
    assert diversity_loss(outputs, 1.0).item() == pytest.approx(0.0)  # batch mean (1 - 1) / 2 = 0
    # Orthogonal in one sample, equal in the other: mean cos = 0.5.
    outputs = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 2.0]]])
    assert diversity_loss(outputs, 1.0).item() == pytest.approx(0.5)
    assert diversity_loss(outputs, 0.5).item() == pytest.approx(1.0)


def test_diversity_loss_three_members():
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    # Pairs (0,1): 0; (0,2): 1/sqrt 2; (1,2): 1/sqrt 2; mean = sqrt(2)/3.
    assert diversity_loss(a, 1.0).item() == pytest.approx(math.sqrt(2) / 3)


def test_diversity_loss_uses_absolute_similarity():
    outputs = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    assert diversity_loss(outputs, 2.0).item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Model-level dropout
# --------------------------------------------------------------------------------------------


def test_drop_members_rescales_kept_outputs():
    outputs = torch.ones(4, 3, 2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        dropped = drop_members(outputs, 0.5, generator)
        per_member = dropped[:, 0, 0]
        kept = int((per_member > 0).sum())
        assert kept >= 1
        # Kept members are scaled by members / kept; dropped ones are zero.
        for value in per_member.tolist():
            assert value == 0.0 or value == pytest.approx(4.0 / kept)
        assert dropped.sum().item() == pytest.approx(outputs.sum().item())


def test_drop_members_keeps_one_when_rate_is_high():
    outputs = torch.ones(3, 2, 2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        dropped = drop_members(outputs, 0.999, generator)
        assert int((dropped[:, 0, 0] > 0).sum()) >= 1
        assert dropped.sum().item() == pytest.approx(outputs.sum().item())


def test_drop_members_keeps_expectation():
    outputs = torch.ones(5, 1, 1)
    generator = torch.Generator().manual_seed(2)
    mean = torch.stack([drop_members(outputs, 0.3, generator) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, torch.ones(5, 1, 1), atol=0.05)


def test_drop_models_only_in_training():
    config = C.resolve(set_values={"use_drop_models": True, "drop_models_expert_rate": 0.9, "drop_models_analyst_rate": 0.9,
                                   "n_total": 4, "expert_hidden": [16, 8], "analyst_hidden": [16, 8]})
    model = CollectiveModel(config).eval()
    x = torch.randn(8, 784)
    assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------------------------
# Efficiency formula
# --------------------------------------------------------------------------------------------


def test_efficiency_formulas():
    assert per_100k(85.2, 8_500_000) == pytest.approx(85.2 / 8_500_000 * 100_000)
    assert per_100k(85.2, 8_500_000) == pytest.approx(1.00235294, rel=1e-8)
    assert per_1m(85.2, 8_500_000) == pytest.approx(10.0235294, rel=1e-8)
