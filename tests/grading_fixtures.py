"""Graders that misbehave, for the timeout test. No heavy imports: a spawned worker imports this module."""

import time


def slow_grade(pred, gold):
    time.sleep(60)
    return 1.0


def crashing_grade(pred, gold):
    raise RecursionError("pathological answer")
