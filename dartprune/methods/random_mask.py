"""`random`: uniformly random neurons per layer, seeded: the floor any method must beat."""
import torch

from dartprune.methods.base import Method, register_method


@register_method
class RandomMask(Method):
    name = "random"
    description = "uniformly random neurons per layer, seeded (the floor any method must beat)"
    trace = None
    reads_trace = False
    allocation = "uniform"

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.config.seed * 100_003 + layer) % 2 ** 64)
        return torch.rand(size, generator=generator)
