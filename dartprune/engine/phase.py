"""A row's phase and every transition between phases, in one table.

TRACING: the row's tokens run dense and are traced (the prompt; a short prompt's first decoded tokens; the
    authors' dense-steps re-trace; a new conversation turn). When the row has traced as many tokens as its target,
    its masks are built (the first time) or rebuilt, and its drift baseline refitted.
PRUNED: the row runs on its kept neurons; a method that follows drift feeds the ring buffer and the monitor.
RETRACING: the monitor asked for a re-trace from the ring buffer; the row keeps running pruned while a slice of
    the layers is re-scored after each step, each layer switching to its new neurons when scored.
"""
from __future__ import annotations

from enum import Enum


class Phase(Enum):
    TRACING = "tracing"
    PRUNED = "pruned"
    RETRACING = "retracing"


class Event(Enum):
    TRACED = "traced"              # the row has traced its target number of tokens
    DRIFT = "drift"                # the monitor fired and the method re-traces from the ring buffer
    DRIFT_DENSE = "drift-dense"    # the monitor fired and the method re-traces by running dense steps
    RESCORED = "rescored"          # every layer of a buffer re-trace has been re-scored
    TURN = "turn"                  # a new conversation turn arrives: trace it as a prompt


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.TRACING, Event.TRACED): Phase.PRUNED,
    (Phase.PRUNED, Event.DRIFT): Phase.RETRACING,
    (Phase.PRUNED, Event.DRIFT_DENSE): Phase.TRACING,
    (Phase.RETRACING, Event.RESCORED): Phase.PRUNED,
    (Phase.PRUNED, Event.TURN): Phase.TRACING,
    (Phase.RETRACING, Event.TURN): Phase.TRACING,
    (Phase.TRACING, Event.TURN): Phase.TRACING,
}


def next_phase(phase: Phase, event: Event) -> Phase:
    """The phase after `event`; an event that cannot happen in `phase` is a bug, not a state to carry on from."""
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise RuntimeError(f"no transition from {phase.value} on {event.value}") from None
