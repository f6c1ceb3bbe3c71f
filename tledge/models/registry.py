"""The registry of backbones: what each is, how it is built and adapted to a new head, where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tledge.data.images import Preprocess
from tledge.errors import TledgeError


@dataclass(frozen=True)
class ModelSpec:
    """A registered backbone: how to build it, where its pretrained weights come from, what input it expects."""

    name: str
    build: Callable[[], nn.Module]  # -> the original architecture module (ImageNet head)
    adapt: Callable[[nn.Module], "TransferNet"]  # original module -> TransferNet
    preprocess: Preprocess
    weights_source: str  # human-readable: where "pretrained" comes from
    load_pretrained: Callable[[], dict] | None  # -> state dict of the original module; None: no pretrained weights
    offline: bool  # pretrained weights available without a network
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise TledgeError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


class TransferNet(nn.Module):
    """``head(neck(blocks(x)))``; ``blocks`` is an ordered ModuleList so any top part can be thawed."""

    def __init__(self, blocks, neck: nn.Module, head: nn.Linear):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.head = head

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the activation that enters ``blocks[start]`` (training on cached activations)."""
        return self.head(self.neck(self.forward_blocks(x, start)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.forward_blocks(x)))

    def reset_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes)
