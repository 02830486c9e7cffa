from collections import Counter

import pytest

from pte.tasks import make_task
from pte.tasks.long_range import LongRange, tokenizer


def test_deterministic_by_seed_and_answers_uniform():
    task = LongRange()
    a, b = task.examples(200, seed=5), task.examples(200, seed=5)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert [e.prompt for e in task.examples(200, seed=6)] != [e.prompt for e in a]
    counts = Counter(e.answer for e in task.examples(5000, seed=1))
    assert set(counts) == set("0123456789") and max(counts.values()) < 1.25 * min(counts.values())


@pytest.mark.parametrize("hops", [1, 6, 9])
def test_answer_follows_the_listed_pointers(hops):
    for e in LongRange(hops=hops, filler=5).examples(50, seed=0):
        pointers = dict(p.split(">") for p in e.prompt.split(" start ")[0].split())
        assert sorted(pointers) == list("0123456789") and sorted(pointers.values()) == list("0123456789")
        value, seen = e.prompt.split(" start ")[1].split()[0], []
        for _ in range(hops):
            value = pointers[value]
            seen.append(value)
        assert e.answer == value and seen == [str(d) for d in e.meta["digits"]]
        assert len(set(seen)) == hops and e.answer != e.prompt.split(" start ")[1][0]  # a 10-cycle never returns early


def test_verifier_accepts_exactly_the_correct_answer():
    task = LongRange(filler=10)
    for e in task.examples(30, seed=2):
        solution = task.solution(e)
        assert task.score(solution, e) == 1.0
        assert solution.count(".") == 10 and f"a{e.answer}" in solution
        for d in "0123456789":
            wrong = solution[:-1] + d
            assert task.score(wrong, e) == (1.0 if d == e.answer else 0.0)
        assert task.score(solution + f" ans {(int(e.answer) + 1) % 10}", e) == 0.0  # the last one counts
        assert task.score("", e) == 0.0 and task.score(f"a{e.answer}", e) == 0.0
        assert task.score(solution.replace("." * 10, "." * 9), e) == 0.0  # the filler shortcut does not score
        assert task.score(solution.replace("." * 10, "." * 12) + " ", e) == 1.0


def test_tokenizer_makes_each_pointer_one_token_and_round_trips():
    tok, task = tokenizer(), LongRange(filler=4)
    e = task.examples(1, seed=3)[0]
    ids = tok(e.prompt)["input_ids"]
    assert len(ids) == 10 * 2 + len("start 4 =") and tok.decode(ids) == e.prompt
    sol = tok(task.solution(e))["input_ids"]
    assert len(sol) == len(task.solution(e)) and tok.decode(sol) == task.solution(e)


def test_difficulty_guard():
    LongRange(filler=40).check_difficulty(layers=4, window=8)
    with pytest.raises(ValueError, match="filler=28 <= layers x window = 4 x 8"):
        LongRange(filler=28).check_difficulty(layers=4, window=8)
    with pytest.raises(ValueError, match="hops=0"):
        make_task("long_range", hops=0)
    with pytest.raises(ValueError, match="hops=10"):
        make_task("long_range", hops=10)
