"""The Collective Model: experts -> expert encoder -> analysts -> analyst encoder -> head.

Members with the same hidden widths are stored as one stacked group and run together, so a
group of G members costs a few large matrix multiplies instead of G small ones. The result is
the same function as calling each member on its own: every member still has its own Linear,
BatchNorm1d and Dropout weights, and BatchNorm over the concatenated features of a group is
BatchNorm per member because statistics are per feature. ``reference.py`` holds the plain
member-by-member model that the tests compare against.

Shapes: B = batch size, G = members in a group, n = members in an expert or analyst group.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import derive_dimensions, member_variant

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ModelOutput(NamedTuple):
    """Logits and the unweighted diversity losses of one forward pass."""

    logits: torch.Tensor  # [B, classes]
    diversity_expert: torch.Tensor  # scalar; 0 when the loss is disabled
    diversity_analyst: torch.Tensor


def _kaiming_normal_(weight: torch.Tensor, fan_in: int) -> None:
    # Kaiming-normal for ReLU with fan-in mode: std = sqrt(2 / fan_in).
    with torch.no_grad():
        weight.normal_(0.0, math.sqrt(2.0 / fan_in))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p), as F.dropout does.

    On the CPU, ``F.dropout`` draws one Bernoulli sample per element, which took about a tenth
    of a training step at the reference config. Here each element uses one 32-bit half of a
    random int64 from the default generator, so there are half as many draws. An element is
    kept when that signed 32-bit value is at least -2**31 + p * 2**32, which happens with
    probability 1 - p to within 2**-32. Other devices use ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    count = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((count + 1) // 2,), dtype=torch.int64, device=x.device)
    lanes = bits.view(torch.int32)[:count].view(x.shape)
    threshold = round(-(2**31) + p * 2**32)
    mask = (lanes >= threshold).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mask


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws its mask with ``dropout`` above (same distribution, cheaper)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _ConcatLinear(torch.autograd.Function):
    """``addmm(bias, cat([x, extra], 1), weight)`` that computes only the gradients autograd needs.

    Autograd through ``torch.cat`` computes the gradient of the whole concatenated input as
    soon as one part needs it. The analysts' first layer reads [raw image, encoded experts],
    and only the encoded part needs a gradient. Skipping the raw image's part saves a
    [B, out] @ [out, input_dim] product per step, about an eighth of a training step's
    arithmetic at the reference config.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, extra: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([x, extra.to(x.dtype)], dim=1)
        ctx.save_for_backward(joined, weight)
        ctx.split = x.shape[1]
        return torch.addmm(bias, joined, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        joined, weight = ctx.saved_tensors
        # Under autocast the output gradient can be half precision while the saved tensors are
        # float32. The products then run in the gradient's dtype, as autocast's addmm backward does.
        joined, weight = joined.to(grad.dtype), weight.to(grad.dtype)
        split = ctx.split
        grad_x = grad.mm(weight[:split].t()) if ctx.needs_input_grad[0] else None
        grad_extra = grad.mm(weight[split:].t()) if ctx.needs_input_grad[1] else None
        grad_weight = joined.t().mm(grad) if ctx.needs_input_grad[2] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_extra, grad_weight, grad_bias


class MemberGroup(nn.Module):
    """G member MLPs with identical widths that all read the same input.

    Member g is: for each hidden width h, Linear -> BatchNorm1d -> ReLU, with Dropout after
    every hidden layer except the last; then Linear to ``out_dim``.

    Storage: the first layer's weight is [in, G, h0] so that one GEMM of the shared input
    against its [in, G*h0] view computes every member at once; later weights are [G, in, out]
    and run as one batched matmul. BatchNorm parameters are [G, h].
    """

    def __init__(self, count: int, in_dim: int, hidden: list[int], out_dim: int, dropout: float):
        super().__init__()
        self.count, self.in_dim, self.hidden, self.out_dim, self.dropout = count, in_dim, list(hidden), out_dim, dropout
        widths = [in_dim, *hidden, out_dim]

        self.first_weight = nn.Parameter(torch.empty(in_dim, count, widths[1]))
        self.first_bias = nn.Parameter(torch.zeros(count, widths[1]))
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(count, widths[i], widths[i + 1])) for i in range(1, len(widths) - 1)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(count, widths[i + 1])) for i in range(1, len(widths) - 1)
        )
        self.bn_weights = nn.ParameterList(nn.Parameter(torch.ones(count, h)) for h in hidden)
        self.bn_biases = nn.ParameterList(nn.Parameter(torch.zeros(count, h)) for h in hidden)
        for i, h in enumerate(hidden):
            self.register_buffer(f"bn_mean_{i}", torch.zeros(count * h))
            self.register_buffer(f"bn_var_{i}", torch.ones(count * h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _kaiming_normal_(self.first_weight, self.in_dim)
        fan_ins = [*self.hidden]
        for weight, fan_in in zip(self.weights, fan_ins):
            _kaiming_normal_(weight, fan_in)

    def _batch_norm(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # h: [B, G*width]; one feature per member and unit, so statistics stay per member.
        return F.batch_norm(
            h,
            getattr(self, f"bn_mean_{layer}"),
            getattr(self, f"bn_var_{layer}"),
            self.bn_weights[layer].reshape(-1),
            self.bn_biases[layer].reshape(-1),
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Map x [B, in] to the members' outputs [G, B, out].

        With ``extra`` [B, e], the input is cat([x, extra], 1) with ``in`` = x's width + e, and
        no gradient is computed for x unless x requires one.
        """
        batch = x.shape[0]
        count = self.count
        last_hidden = len(self.hidden) - 1

        # Hidden layer 0 for all members in one GEMM: [B, in] @ [in, G*h0] -> [B, G*h0].
        first_weight = self.first_weight.reshape(self.in_dim, -1)
        if extra is None:
            h = torch.addmm(self.first_bias.reshape(-1), x, first_weight)
        else:
            h = _ConcatLinear.apply(x, extra, first_weight, self.first_bias.reshape(-1))
        for layer in range(len(self.hidden)):
            if layer > 0:
                # [G, B, h_prev] @ [G, h_prev, h] -> [G, B, h], then back to [B, G*h] for BatchNorm.
                h = torch.baddbmm(self.biases[layer - 1].unsqueeze(1), h, self.weights[layer - 1])
                h = h.transpose(0, 1).reshape(batch, -1)
            h = F.relu(self._batch_norm(h, layer))
            if layer < last_hidden and self.dropout > 0:
                h = dropout(h, self.dropout, self.training)
            h = h.reshape(batch, count, -1).transpose(0, 1)  # [G, B, h]

        # Output layer: [G, B, h_last] @ [G, h_last, out] -> [G, B, out].
        return torch.baddbmm(self.biases[-1].unsqueeze(1), h, self.weights[-1])


class MemberEnsemble(nn.Module):
    """All experts (or all analysts): members grouped by architecture, outputs in member order."""

    def __init__(self, count: int, in_dim: int, base_hidden: list[int], out_dim: int, dropout: float, vary: bool):
        super().__init__()
        self.count = count
        widths_per_member = [member_variant(base_hidden, i, vary) for i in range(count)]
        # Group members with equal widths, keeping the first appearance order.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, widths in enumerate(widths_per_member):
            groups.setdefault(tuple(widths), []).append(index)
        self.member_widths = widths_per_member
        self.group_members = [members for members in groups.values()]
        self.groups = nn.ModuleList(
            MemberGroup(len(members), in_dim, list(widths), out_dim, dropout) for widths, members in groups.items()
        )
        order = [index for members in self.group_members for index in members]
        # Position of member i in the concatenation of the groups' outputs.
        inverse = [0] * count
        for position, index in enumerate(order):
            inverse[index] = position
        self.needs_reorder = order != list(range(count))
        self.register_buffer("reorder", torch.tensor(inverse, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Map x [B, in] (or cat([x, extra], 1)) to every member's output [n, B, out], member i at index i."""
        outputs = [group(x, extra) for group in self.groups]
        stacked = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        if self.needs_reorder:
            stacked = stacked.index_select(0, self.reorder)
        return stacked


class Encoder(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> Dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU(), Dropout(dropout))


class HeadMLP(nn.Sequential):
    """Linear(in -> hidden) -> ReLU -> Dropout -> Linear(hidden -> classes)."""

    def __init__(self, in_dim: int, hidden: int, classes: int, dropout: float):
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, classes))


def diversity_loss(outputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over member pairs of |batch-mean cosine similarity| / temperature.

    outputs: [n, B, d] with n >= 2. Returns a scalar. Each output vector is divided by
    max(its norm, 1e-8), as ``F.normalize`` does.

    >>> a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # 3 members, B = 1
    >>> round(diversity_loss(a, 1.0).item(), 6)  # pairs: 0, 1/sqrt2, 1/sqrt2
    0.471405
    """
    return _DiversityLoss.apply(outputs, temperature)


class _DiversityLoss(torch.autograd.Function):
    """``diversity_loss`` with a hand-written backward.

    Autograd through normalize, einsum, pair indexing and the mean took 0.7 to 0.9 ms of
    forward and backward per member group at the reference config on 2 CPU cores, mostly in
    small kernels. This takes about 0.3 ms. Half-precision outputs are computed in float32
    with autocast off, so that mixed precision does not round the similarities.
    """

    EPS = 1e-8

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, temperature: float) -> torch.Tensor:
        count, batch = outputs.shape[0], outputs.shape[1]
        with torch.autocast(outputs.device.type, enabled=False):
            vectors = outputs.reshape(count, batch, -1)
            if vectors.dtype in (torch.float16, torch.bfloat16):
                vectors = vectors.float()
            norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)  # [n, B, 1]
            denominators = norms.clamp_min(_DiversityLoss.EPS)
            unit = vectors / denominators
            # similarity[i, j] = mean over the batch of cos(member i, member j).
            flat = unit.reshape(count, -1)
            similarity = torch.mm(flat, flat.t()).div_(batch)
            upper = torch.ones(count, count, dtype=torch.bool, device=outputs.device).triu_(1)
            scale = 1.0 / (count * (count - 1) // 2 * temperature)  # mean over pairs, / temperature
            signs = similarity.sign().mul_(upper)  # d|s|/ds on the pairs, 0 elsewhere
            loss = (similarity.abs() * upper).sum() * scale
        ctx.save_for_backward(unit, denominators, norms, signs)
        ctx.scale, ctx.batch, ctx.shape, ctx.dtype = scale, batch, outputs.shape, outputs.dtype
        return loss.to(outputs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, denominators, norms, signs = ctx.saved_tensors
        count = unit.shape[0]
        # d loss / d similarity, made symmetric because similarity = unit @ unit.T / B.
        d_similarity = signs * (grad.to(signs.dtype) * ctx.scale / ctx.batch)
        d_similarity = d_similarity + d_similarity.t()
        d_unit = torch.mm(d_similarity, unit.reshape(count, -1)).view_as(unit)
        # unit = x / max(|x|, eps): where |x| >= eps the radial part of the gradient drops out.
        radial = (unit * d_unit).sum(-1, keepdim=True).mul_(norms >= _DiversityLoss.EPS)
        d_vectors = (d_unit - unit * radial) / denominators
        return d_vectors.reshape(ctx.shape).to(ctx.dtype), None


def drop_members(outputs: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero whole members with probability ``rate`` and scale the kept ones by n / kept.

    At least one member is kept. outputs: [n, B, d]. Returns a tensor of the same shape.
    """
    count = outputs.shape[0]
    keep = torch.rand(count, generator=generator, device="cpu") >= rate
    if not keep.any():
        keep[torch.randint(count, (1,), generator=generator, device="cpu")] = True
    scale = keep.to(outputs.dtype) * (count / keep.sum().item())
    if outputs.device.type == "cuda":
        scale = scale.pin_memory()  # queued copy; a blocking one would wait for all queued GPU work
    return outputs * scale.to(outputs.device, non_blocking=True).view(count, 1, 1)


def _concat_members(outputs: torch.Tensor) -> torch.Tensor:
    # [n, B, d] -> [B, n*d] with member 0's features first.
    return outputs.transpose(0, 1).reshape(outputs.shape[1], -1)


class CollectiveModel(nn.Module):
    """The Collective Model built from a validated config (see config.derive_dimensions)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = dict(config)
        dims = derive_dimensions(config)
        self.dims = dims
        classes = dims["num_classes"]

        self.experts = MemberEnsemble(
            dims["n_experts"], dims["input_dim"], config["expert_hidden"], config["expert_output"],
            config["member_dropout"], config["vary_expert_architectures"],
        )
        self.expert_encoder = Encoder(dims["n_experts"] * config["expert_output"], dims["expert_encoder_dim"], config["encoder_dropout"])
        self.analysts = MemberEnsemble(
            dims["n_analysts"], dims["analyst_input_dim"], config["analyst_hidden"], config["analyst_output"],
            config["member_dropout"], config["vary_analyst_architectures"],
        )
        self.analyst_encoder = Encoder(dims["n_analysts"] * config["analyst_output"], dims["collective_input_dim"], config["encoder_dropout"])
        if config["collective_version"] == "encoder_head":
            self.head_encoder = Encoder(dims["collective_input_dim"], dims["head_input_dim"], config["encoder_dropout"])
        else:
            self.head_encoder = nn.Identity()
        self.head = HeadMLP(dims["head_input_dim"], dims["head_hidden_dim"], classes, config["head_dropout"])

        self.use_expert_diversity = config["use_expert_diversity"]
        self.use_analyst_diversity = config["use_analyst_diversity"] and dims["n_analysts"] >= 2
        self.temperature = config["diversity_temperature"]
        self.use_drop_models = config["use_drop_models"]
        self.expert_drop_rate = config["drop_models_expert_rate"]
        self.analyst_drop_rate = config["drop_models_analyst_rate"]
        self.drop_generator: torch.Generator | None = None
        self._init_dense_layers()

    def _init_dense_layers(self) -> None:
        for module in (self.expert_encoder, self.analyst_encoder, self.head_encoder, self.head):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)

    def num_parameters(self) -> int:
        """Return the number of trainable parameters (``model_params``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward_with_losses(self, x: torch.Tensor) -> ModelOutput:
        """Run x [B, input_dim] through all stages; also return the diversity losses."""
        zero = x.new_zeros(())

        # 1. Experts and their diversity (measured before model-level dropout).
        expert_out = self.experts(x)  # [n_experts, B, expert_output]
        div_expert = diversity_loss(expert_out, self.temperature) if self.use_expert_diversity else zero
        if self.training and self.use_drop_models:
            expert_out = drop_members(expert_out, self.expert_drop_rate, self.drop_generator)

        # 2. Expert encoder; the raw input skips past the experts to the analysts.
        encoded = self.expert_encoder(_concat_members(expert_out))

        # 3. Analysts read cat([x, encoded], 1).
        analyst_out = self.analysts(x, encoded)  # [n_analysts, B, analyst_output]
        div_analyst = diversity_loss(analyst_out, self.temperature) if self.use_analyst_diversity else zero
        if self.training and self.use_drop_models:
            analyst_out = drop_members(analyst_out, self.analyst_drop_rate, self.drop_generator)

        # 4. Analyst encoder and collective head.
        collective = self.analyst_encoder(_concat_members(analyst_out))
        logits = self.head(self.head_encoder(collective))
        return ModelOutput(logits, div_expert, div_analyst)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_losses(x).logits


def build_model(config: Mapping[str, Any]) -> CollectiveModel:
    """Build the model of a validated config."""
    return CollectiveModel(config)
