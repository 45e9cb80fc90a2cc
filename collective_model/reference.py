"""A plain member-by-member Collective Model, for tests and the benchmark's reference pipeline.

It calls each member (an ``nn.Sequential``) in a Python loop, as a straightforward
implementation would. ``ReferenceCollectiveModel.from_fast`` copies the weights of a
``CollectiveModel`` so that both compute the same function.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .config import derive_dimensions, member_variant
from .models import BN_EPS, BN_MOMENTUM, CollectiveModel, Encoder, HeadMLP, ModelOutput, MemberGroup, diversity_loss


def member_mlp(in_dim: int, hidden: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Build one member: (Linear -> BatchNorm1d -> ReLU [-> Dropout]) per hidden width, then Linear."""
    layers: list[nn.Module] = []
    width = in_dim
    for i, h in enumerate(hidden):
        layers += [nn.Linear(width, h), nn.BatchNorm1d(h, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU()]
        if i < len(hidden) - 1:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ReferenceCollectiveModel(nn.Module):
    """The Collective Model with one ``nn.Sequential`` per member, run in a Python loop."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        dims = derive_dimensions(config)
        self.dims = dims
        self.experts = nn.ModuleList(
            member_mlp(dims["input_dim"], member_variant(config["expert_hidden"], i, config["vary_expert_architectures"]),
                       config["expert_output"], config["member_dropout"])
            for i in range(dims["n_experts"])
        )
        self.analysts = nn.ModuleList(
            member_mlp(dims["analyst_input_dim"], member_variant(config["analyst_hidden"], i, config["vary_analyst_architectures"]),
                       config["analyst_output"], config["member_dropout"])
            for i in range(dims["n_analysts"])
        )
        self.expert_encoder = Encoder(dims["n_experts"] * config["expert_output"], dims["expert_encoder_dim"], config["encoder_dropout"])
        self.analyst_encoder = Encoder(dims["n_analysts"] * config["analyst_output"], dims["collective_input_dim"], config["encoder_dropout"])
        if config["collective_version"] == "encoder_head":
            self.head_encoder: nn.Module = Encoder(dims["collective_input_dim"], dims["head_input_dim"], config["encoder_dropout"])
        else:
            self.head_encoder = nn.Identity()
        self.head = HeadMLP(dims["head_input_dim"], dims["head_hidden_dim"], dims["num_classes"], config["head_dropout"])
        self.use_expert_diversity = config["use_expert_diversity"]
        self.use_analyst_diversity = config["use_analyst_diversity"] and dims["n_analysts"] >= 2
        self.temperature = config["diversity_temperature"]

    @classmethod
    def from_fast(cls, model: CollectiveModel) -> "ReferenceCollectiveModel":
        """Build a reference model holding exactly the weights of ``model``."""
        reference = cls(model.config)
        for ensemble, members in ((model.experts, reference.experts), (model.analysts, reference.analysts)):
            for group, indices in zip(ensemble.groups, ensemble.group_members):
                for g, index in enumerate(indices):
                    _copy_member(group, g, members[index])
        for name in ("expert_encoder", "analyst_encoder", "head_encoder", "head"):
            getattr(reference, name).load_state_dict(getattr(model, name).state_dict())
        return reference.to(next(model.parameters()).device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward_with_losses(self, x: torch.Tensor) -> ModelOutput:
        zero = x.new_zeros(())
        expert_out = [expert(x) for expert in self.experts]
        div_expert = diversity_loss(torch.stack(expert_out), self.temperature) if self.use_expert_diversity else zero
        encoded = self.expert_encoder(torch.cat(expert_out, dim=1))
        analyst_in = torch.cat([x, encoded], dim=1)
        analyst_out = [analyst(analyst_in) for analyst in self.analysts]
        div_analyst = diversity_loss(torch.stack(analyst_out), self.temperature) if self.use_analyst_diversity else zero
        collective = self.analyst_encoder(torch.cat(analyst_out, dim=1))
        return ModelOutput(self.head(self.head_encoder(collective)), div_expert, div_analyst)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_losses(x).logits


def _copy_member(group: MemberGroup, g: int, member: nn.Sequential) -> None:
    linears = [m for m in member if isinstance(m, nn.Linear)]
    norms = [m for m in member if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        linears[0].weight.copy_(group.first_weight[:, g, :].T)
        linears[0].bias.copy_(group.first_bias[g])
        for linear, weight, bias in zip(linears[1:], group.weights, group.biases):
            linear.weight.copy_(weight[g].T)
            linear.bias.copy_(bias[g])
        for layer, norm in enumerate(norms):
            width = norm.num_features
            norm.weight.copy_(group.bn_weights[layer][g])
            norm.bias.copy_(group.bn_biases[layer][g])
            norm.running_mean.copy_(getattr(group, f"bn_mean_{layer}")[g * width:(g + 1) * width])
            norm.running_var.copy_(getattr(group, f"bn_var_{layer}")[g * width:(g + 1) * width])
