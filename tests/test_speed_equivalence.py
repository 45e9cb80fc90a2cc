"""The fast model computes the same function as the plain member-by-member reference.

The fast model stacks members of equal widths into batched matrix multiplies, skips the raw
input's gradient in the analysts' first layer and draws dropout masks from random integers. With equal
weights and dropout disabled it must match ``ReferenceCollectiveModel`` in float32 to a relative
error of 1e-5, in training mode (batch statistics, running-statistics updates) and in evaluation
mode, and its gradients must match too.
"""

from __future__ import annotations

import pytest
import torch

from collective_model import config as C
from collective_model.models import CollectiveModel, _ConcatLinear, diversity_loss, dropout
from collective_model.reference import ReferenceCollectiveModel

NO_DROPOUT = {"member_dropout": 0.0, "encoder_dropout": 0.0, "head_dropout": 0.0, "use_drop_models": False}

CONFIGS = {
    "reference": {
        "n_total": 8, "expert_ratio": 0.2, "expert_hidden": [512, 256], "expert_output": 128,
        "analyst_hidden": [256, 128], "analyst_output": 64, "c_expert": 0.25, "c_collective": 1.0,
        "collective_version": "simple_mlp",
    },
    # Ten members of each of the four width variants, so groups hold 1 to 3 members and the
    # deeper variant has three hidden layers.
    "vary_both": {
        "n_total": 10, "n_experts": 5, "vary_expert_architectures": True, "vary_analyst_architectures": True,
        "expert_hidden": [48, 24], "expert_output": 16, "analyst_hidden": [40, 20], "analyst_output": 12,
    },
    "vary_analysts_encoder_head": {
        "n_total": 7, "n_experts": 2, "vary_analyst_architectures": True, "collective_version": "encoder_head",
        "expert_hidden": [32, 16], "expert_output": 8, "analyst_hidden": [24, 12], "analyst_output": 6,
        "head_compression": 0.5, "collective_hidden_scale": 1.5,
    },
    "three_hidden_layers_no_diversity": {
        "n_total": 5, "n_experts": 3, "expert_hidden": [40, 24, 16], "expert_output": 10,
        "analyst_hidden": [30, 20, 10], "analyst_output": 5, "c_expert": 0.5, "c_collective": 0.5,
        "use_expert_diversity": False, "use_analyst_diversity": False,
    },
    "one_analyst_cifar10": {
        "dataset": "cifar10", "n_total": 3, "expert_hidden": [20, 10], "expert_output": 6,
        "analyst_hidden": [12, 8], "analyst_output": 4,
    },
}

TOLERANCE = 1e-5


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    """Return max |fast - reference| / max |reference| (0 when both are all zeros)."""
    scale = reference.abs().max().item()
    difference = (fast - reference).abs().max().item()
    return difference / scale if scale > 0 else difference


def build_pair(overrides: dict, seed: int = 0) -> tuple[CollectiveModel, ReferenceCollectiveModel, dict]:
    config = C.resolve(set_values={**overrides, **NO_DROPOUT})
    torch.manual_seed(seed)
    fast = CollectiveModel(config)
    # Non-trivial BatchNorm affine parameters and biases, so that copying them is tested too.
    with torch.no_grad():
        for name, parameter in fast.named_parameters():
            if "bias" in name or "bn_" in name or parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    reference = ReferenceCollectiveModel.from_fast(fast)
    return fast, reference, config


def random_inputs(config: dict, batch: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C.derive_dimensions(config)["input_dim"], generator=generator)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_equal(name):
    fast, reference, _ = build_pair(CONFIGS[name])
    assert fast.num_parameters() == reference.num_parameters()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_mode_outputs_match(name):
    fast, reference, config = build_pair(CONFIGS[name])
    fast.train()
    reference.train()
    # Two steps with different inputs, so the second also depends on the first's running statistics.
    for seed in (1, 2):
        x = random_inputs(config, seed=seed)
        out_fast, out_reference = fast.forward_with_losses(x), reference.forward_with_losses(x)
        assert relative_error(out_fast.logits, out_reference.logits) <= TOLERANCE
        assert relative_error(out_fast.diversity_expert, out_reference.diversity_expert) <= TOLERANCE
        assert relative_error(out_fast.diversity_analyst, out_reference.diversity_analyst) <= TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
def test_evaluation_mode_outputs_match(name):
    fast, reference, config = build_pair(CONFIGS[name])
    # Update the running statistics of both models with the same training batches first.
    fast.train()
    reference.train()
    with torch.no_grad():
        for seed in (1, 2, 3):
            x = random_inputs(config, seed=seed)
            fast(x)
            reference(x)
    fast.eval()
    reference.eval()
    x = random_inputs(config, batch=17, seed=4)
    with torch.no_grad():
        assert relative_error(fast(x), reference(x)) <= TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match(name):
    fast, reference, config = build_pair(CONFIGS[name])
    fast.train()
    reference.train()
    x = random_inputs(config)
    target = torch.arange(x.shape[0]) % 10
    for model in (fast, reference):
        out = model.forward_with_losses(x)
        loss = torch.nn.functional.cross_entropy(out.logits, target) + out.diversity_expert + out.diversity_analyst
        loss.backward()

    # Each member's gradients as one vector in the reference's parameter order, gathered from
    # the fast model's stacked storage. One vector, because the gradient of a bias followed by
    # BatchNorm (directly, or through the encoder after a member's output) is zero up to
    # rounding, and only the member's overall scale makes that noise comparable.
    for ensemble, members in ((fast.experts, reference.experts), (fast.analysts, reference.analysts)):
        for group, indices in zip(ensemble.groups, ensemble.group_members):
            for g, index in enumerate(indices):
                fast_grads = [group.first_weight.grad[:, g, :].T, group.first_bias.grad[g]]
                # BatchNorm of hidden layer i, then the Linear from hidden layer i to the next.
                for layer in range(len(group.hidden)):
                    fast_grads += [group.bn_weights[layer].grad[g], group.bn_biases[layer].grad[g]]
                    fast_grads += [group.weights[layer].grad[g].T, group.biases[layer].grad[g]]
                reference_grads = [p.grad for p in members[index].parameters()]
                assert [t.shape for t in fast_grads] == [t.shape for t in reference_grads]
                fast_vector = torch.cat([t.flatten() for t in fast_grads])
                reference_vector = torch.cat([t.flatten() for t in reference_grads])
                assert relative_error(fast_vector, reference_vector) <= TOLERANCE
    for name_ in ("expert_encoder", "analyst_encoder", "head"):
        # All of a module's gradients as one vector, so that the zero gradient of a bias before
        # BatchNorm is measured against the module's scale.
        fast_grads = torch.cat([p.grad.flatten() for p in getattr(fast, name_).parameters()])
        reference_grads = torch.cat([p.grad.flatten() for p in getattr(reference, name_).parameters()])
        assert relative_error(fast_grads, reference_grads) <= TOLERANCE


def test_concat_linear_gradients_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    extra = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(_ConcatLinear.apply, (x, extra, weight, bias))


def test_concat_linear_skips_input_without_grad():
    x = torch.randn(5, 4)
    extra = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(7, 6, requires_grad=True)
    bias = torch.zeros(6, requires_grad=True)
    _ConcatLinear.apply(x, extra, weight, bias).sum().backward()
    assert x.grad is None
    expected = torch.ones(5, 6) @ weight[4:].detach().T
    assert torch.allclose(extra.grad, expected)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_keep_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(400, 1001)  # an odd element count exercises the half-used last int64
    out = dropout(x, p, training=True)
    kept = out != 0
    # 400,400 draws: the kept fraction's standard deviation is below 0.0008.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.004
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))


def test_dropout_mask_varies_between_calls():
    torch.manual_seed(0)
    x = torch.ones(64, 64)
    assert not torch.equal(dropout(x, 0.2, True), dropout(x, 0.2, True))


def test_dropout_identity_in_evaluation_and_at_zero():
    x = torch.randn(8, 9)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x


def test_dropout_gradient_is_mask():
    torch.manual_seed(0)
    x = torch.randn(50, 60, requires_grad=True)
    out = dropout(x, 0.3, training=True)
    out.sum().backward()
    assert torch.allclose(x.grad, (out != 0).float() / 0.7)


def test_concat_linear_under_autocast_keeps_float32_gradients():
    # The product uses CUDA autocast; CPU autocast exercises the same mixed-dtype backward.
    fast, _, config = build_pair(CONFIGS["vary_analysts_encoder_head"])
    x = random_inputs(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.forward_with_losses(x)
        loss = out.logits.float().sum() + out.diversity_expert + out.diversity_analyst
    loss.backward()
    for name, parameter in fast.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


def diversity_loss_by_pairs(outputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The diversity loss written out pair by pair with F.cosine_similarity's definition."""
    count = outputs.shape[0]
    unit = outputs / outputs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    terms = [(unit[i] * unit[j]).sum(-1).mean().abs() for i in range(count) for j in range(i + 1, count)]
    return torch.stack(terms).mean() / temperature


@pytest.mark.parametrize("shape", [(2, 7, 3), (5, 4, 6), (6, 128, 64)])
def test_diversity_loss_matches_pairwise_loop(shape):
    outputs = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fast = diversity_loss(outputs, 0.7)
    (fast_grad,) = torch.autograd.grad(fast, outputs)
    expected = diversity_loss_by_pairs(outputs, 0.7)
    (expected_grad,) = torch.autograd.grad(expected, outputs)
    assert fast.item() == pytest.approx(expected.item(), rel=1e-12)
    assert relative_error(fast_grad, expected_grad) <= 1e-10


def test_diversity_loss_gradcheck():
    outputs = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda o: diversity_loss(o, 1.3), (outputs,))


def test_diversity_loss_zero_vector_matches_pairwise_loop():
    # A zero output vector is divided by 1e-8 instead of its norm, as F.normalize does; a
    # finite-difference check cannot step across that kink, so compare with autograd instead.
    outputs = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outputs[1, 2] = 0.0
    outputs.requires_grad_(True)
    (fast_grad,) = torch.autograd.grad(diversity_loss(outputs, 1.3), outputs)
    (expected_grad,) = torch.autograd.grad(diversity_loss_by_pairs(outputs, 1.3), outputs)
    assert relative_error(fast_grad, expected_grad) <= 1e-10


def test_diversity_loss_half_precision_input():
    outputs = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(2))
    low = outputs.to(torch.bfloat16).requires_grad_(True)
    loss = diversity_loss(low, 1.0)
    loss.backward()
    assert loss.dtype == torch.bfloat16
    assert low.grad.dtype == torch.bfloat16
    assert loss.float().item() == pytest.approx(diversity_loss(low.detach().float(), 1.0).item(), rel=1e-2)
