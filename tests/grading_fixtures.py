"""Graders that misbehave, for the timeout test. No heavy imports: a spawned worker imports this module."""

import time


def slow_grade(pred, gold):
    time.sleep(60)
    return 1.0


def crashing_grade(pred, gold):
    raise RecursionError("pathological answer")


def deaf_grade(pred, gold):
    """Hangs with SIGALRM blocked, as native code that never returns to the interpreter would."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(60)
    return 1.0
