"""`dense`: the unpruned model through the same code and statistics (the reference every speedup divides by)."""
from dartprune.methods.base import Method, register_method


@register_method
class Dense(Method):
    name = "dense"
    description = "the unpruned model, through the same code and stats"
    prunes = False
    trace = None
