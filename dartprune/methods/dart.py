"""`dart`: prompt-traced neurons under sensitivity budgets, re-traced when the attention output drifts
(docs/algorithm.md §1-5)."""
from dartprune.methods.base import Method, register_method


@register_method
class Dart(Method):
    name = "dart"
    description = "prompt-traced neurons, sensitivity budgets, re-traced on attention drift (no calibration)"
    follows_drift = True
    follows_turns = True
