from collections import Counter

import pytest

from pte.tasks import make_task
from pte.tasks.long_range import LongRange


def test_deterministic_by_seed_and_answers_uniform():
    task = LongRange()
    a, b = task.examples(200, seed=5), task.examples(200, seed=5)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert [e.prompt for e in task.examples(200, seed=6)] != [e.prompt for e in a]
    counts = Counter(e.answer for e in task.examples(5000, seed=1))
    assert set(counts) == set("0123456789") and max(counts.values()) < 1.25 * min(counts.values())


def test_answer_is_the_chain_of_operations():
    ex = LongRange(n_ops=3, filler=5).examples(50, seed=0)
    for e in ex:
        value = e.meta["start"]
        for op, k in e.meta["ops"]:
            value = eval(f"({value}{op}{k}) % 10")
        assert e.answer == str(value)
        assert e.prompt == f"{e.meta['start']} " + " ".join(f"{op}{k}" for op, k in e.meta["ops"]) + " ="


def test_verifier_accepts_exactly_the_correct_answer():
    task = LongRange(filler=10)
    for e in task.examples(30, seed=2):
        solution = task.solution(e)
        assert task.score(solution, e) == 1.0
        assert solution.count(".") == 10 and f"a{e.answer}" in solution
        for d in "0123456789":
            wrong = solution[:-1] + d
            assert task.score(wrong, e) == (1.0 if d == e.answer else 0.0)
        assert task.score(f"ans {e.answer} ... ans {(int(e.answer) + 1) % 10}", e) == 0.0  # the last one counts
        assert task.score("", e) == 0.0 and task.score(f"a{e.answer}", e) == 0.0


def test_difficulty_guard():
    LongRange(filler=40).check_difficulty(layers=4, window=8)
    with pytest.raises(ValueError, match="filler=28 <= layers x window = 4 x 8"):
        LongRange(filler=28).check_difficulty(layers=4, window=8)
    with pytest.raises(ValueError, match="n_ops=0"):
        make_task("long_range", n_ops=0)
