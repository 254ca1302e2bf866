"""The worker state machine as one explicit transition table."""

from __future__ import annotations

from bus.protocol import WorkerState as S

TRANSITIONS: dict[S, frozenset[S]] = {
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> STOPPED: a load that failed while nobody wants the model up (the next request tries again)
    S.STARTING: frozenset({S.READY, S.STOPPING, S.STOPPED, S.BACKOFF, S.FATAL}),
    S.READY: frozenset({S.STOPPING, S.BACKOFF, S.FATAL}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FATAL}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}

# A process exists (or may still exist) in these states.
RUNNING = frozenset({S.STARTING, S.READY, S.STOPPING})


class IllegalTransition(RuntimeError):
    pass


def check(current: S, new: S) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {new.value}")


def backoff_delay(failures: int, base: float, maximum: float) -> float:
    """Growing delay after the n-th consecutive failure (1-based): base, 2*base, 4*base ... capped."""
    if failures <= 0:
        return 0.0
    return min(maximum, base * (2 ** (failures - 1)))
