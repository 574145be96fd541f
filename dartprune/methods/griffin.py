"""`griffin`: GRIFFIN (arXiv 2404.01365): each prompt token's activations normalised to unit length before the
sum of squares, the same keep fraction in every layer, the mask fixed for the generation."""
from dartprune.methods.base import Method, register_method


@register_method
class Griffin(Method):
    name = "griffin"
    description = "GRIFFIN: per-token L2-normalised prompt activations, same keep fraction in every layer"
    trace = "griffin"
    allocation = "uniform"
