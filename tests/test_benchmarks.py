import itertools
import json

import pytest

from pte.benchmarks import REGISTRY, load_benchmark
from pte.passk import pass_at_k

# one record of each set, in its published layout
FIXTURES = {
    "gsm8k": ({"question": "Q?", "answer": "work\n#### 1,072"}, "1072"),
    "math500": ({"problem": "P", "solution": "s \\boxed{\\frac{\\pi}{2}}", "answer": "\\frac{\\pi}{2}",
                 "subject": "Precalculus", "level": 2}, "\\frac{\\pi}{2}"),
    "aime24": ({"id": 60, "problem": "P", "solution": "s", "answer": "204", "url": "u"}, "204"),
    "aime25": ({"id": 0, "problem": "P", "answer": "70"}, "70"),
    "amc23": ({"id": 0, "question": "P", "answer": 27.0, "url": "u"}, "27.0"),
    "minerva_math": ({"problem": "P", "solution": "so $\\boxed{1.6}$ cm", "type": "t", "idx": 0}, "1.6"),
    "olympiadbench": ({"id": 1, "question": "P", "final_answer": ["$\\frac{1}{2}$"], "unit": None}, "$\\frac{1}{2}$"),
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_loader_reads_its_published_format(tmp_path, name):
    record, gold = FIXTURES[name]
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps(record) + "\n")
    (ex,) = load_benchmark(name, f)
    assert ex.prompt == "P" or ex.prompt == "Q?"
    assert ex.answer == gold
    f.write_text(json.dumps(record) + "\n" + "{broken\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: not valid JSON"):
        load_benchmark(name, f)


def test_shared_copies_load_with_their_published_row_counts():
    """The offline copies in ../shared/data (a slow-ish check: ~3k JSON lines)."""
    for name, spec in REGISTRY.items():
        assert len(load_benchmark(name)) == spec.rows, name


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - brute) < 1e-12
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
