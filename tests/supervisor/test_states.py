import pytest

from bus.protocol import WorkerState as S
from supervisor import states


def test_every_state_has_a_row() -> None:
    assert set(states.TRANSITIONS) == set(S)


@pytest.mark.parametrize(("a", "b"), [(S.STOPPED, S.READY), (S.READY, S.STARTING), (S.STOPPING, S.READY),
                                      (S.FATAL, S.READY)])
def test_illegal_transitions_raise(a: S, b: S) -> None:
    with pytest.raises(states.IllegalTransition):
        states.check(a, b)


def test_a_failed_load_may_stop_without_a_retry() -> None:
    states.check(S.STARTING, S.STOPPED)  # (nobody wants the model up any more: see WorkerManager._keep_up)


def test_lifecycle_path_is_legal() -> None:
    path = [S.STOPPED, S.STARTING, S.READY, S.BACKOFF, S.STARTING, S.READY, S.STOPPING, S.STOPPED]
    for a, b in zip(path, path[1:], strict=False):
        states.check(a, b)


def test_backoff_grows_and_is_capped() -> None:
    delays = [states.backoff_delay(n, 1.0, 10.0) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert states.backoff_delay(0, 1.0, 10.0) == 0.0
