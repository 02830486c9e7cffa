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


def test_countdown_variant_counts_blocks_and_verifies_the_whole_countdown():
    task = LongRange(countdown=3, block=4)
    tok = tokenizer(countdown=True)
    for e in task.examples(20, seed=4):
        solution = task.solution(e)
        assert e.prompt.endswith(" #03 =") and task.filler_text == "#02...#01...#00..."  # the counter before the first
        assert task.score(solution, e) == 1.0
        assert task.score(solution[:-1] + str((int(e.answer) + 1) % 10), e) == 0.0
        assert task.score(solution.replace("#01...", ""), e) == 0.0  # a skipped block does not score
        assert task.score(solution.replace("#01", "#02"), e) == 0.0  # nor a wrong counter
        ids = tok(solution)["input_ids"]
        assert tok.decode(ids) == solution
        assert len(ids) == len(solution) - 3 * (len("#00") - 1)  # each counter is one token
    # the distance in tokens between the restated result and its use grows with the countdown alone
    assert LongRange(countdown=20).thought_tokens_before_answer() - \
        LongRange(countdown=10).thought_tokens_before_answer() == 10 * 4
    # the plain task's token ids do not move when the counters are added
    plain, counted = tokenizer(), tokenizer(countdown=True)
    text = "9>6 4>2 start 4 = 2 0 a0 .... ans 0"
    assert plain(text)["input_ids"] == counted(text)["input_ids"] and len(counted) == len(plain) + 100


def test_countdown_variant_rejects_bad_settings():
    with pytest.raises(ValueError, match="countdown=0: must be in 1..99"):
        LongRange(countdown=0)
    with pytest.raises(ValueError, match="block=0"):
        LongRange(countdown=2, block=0)
    with pytest.raises(ValueError, match="countdown=5 x block=4 = 20 tokens <= layers x window = 4 x 8"):
        LongRange(countdown=5).check_difficulty(layers=4, window=8)
    LongRange(countdown=10).check_difficulty(layers=4, window=8)


def test_countdown_variant_accepts_up_to_the_counter_the_question_needs():
    LongRange(countdown=99).examples(1, seed=0)  # names #99
    with pytest.raises(ValueError, match="countdown=100: must be in 1..99"):
        LongRange(countdown=100)
