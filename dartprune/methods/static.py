"""`static`: DART's prompt mask and budgets, kept for the whole generation (DART without its dynamic part)."""
from dartprune.methods.base import Method, register_method


@register_method
class Static(Method):
    name = "static"
    description = "DART's prompt mask and budgets, kept for the whole generation (no calibration)"
