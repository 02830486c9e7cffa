"""A long-range reasoning task: the answer is written early in the model's own thought and needed only at the end.

The question lists a random cycle over the ten digits as pointers (``"a>b"``: the successor of ``a`` is ``b``,
in shuffled order) and a start digit. The worked thought follows the pointers ``hops`` times, writing each digit
it reaches, restates the last one as ``a<d>``, runs a filler stretch of ``filler`` characters, then ``ans <d>``:

    "9>6 4>2 8>1 6>7 0>9 1>5 7>8 2>0 3>4 5>3 start 4 =" -> " 2 0 9 6 7 8 a8 ........ ans 8"

Why this design. The pointers form one 10-cycle, so ``hops`` (1-9) steps never return to the start and the
answer is uniform over 0-9 (chance = 10%). Each hop is one content lookup, which a small transformer learns fast
when a pointer is a single token (:func:`tokenizer`); recomputing ``hops = 6`` of them inside one forward pass at
``ans`` would take a lookup per layer, more than a 4-layer model has, so at ``ans`` the result survives only in
what the cache kept. The filler carries no information: with a sliding window shorter than it, the restated
``a8`` has been evicted. Keys and values can still relay information forward by about one window per layer, so
the filler must be longer than ``layers x window`` (:meth:`LongRange.check_difficulty`). A full cache solves it;
a plain sliding window cannot; PTE's state can, if it keeps what was evicted.

(An earlier design, mod-10 arithmetic on a start digit with character-level operations, was not learnt; the
pointer version is: docs/log.md, 2026-11-23, "The long-range task".)

Verification is exact: the last ``ans D`` of the completion must be the answer digit, and it must follow a filler
stretch of at least ``filler`` characters (otherwise RL finds the shortcut of skipping the filler).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pte.data import Example

_ANS = re.compile(r"ans (\d)")
POINTERS = tuple(f"{a}>{b}" for a in range(10) for b in range(10))


def tokenizer():
    """Character-level, plus one token per pointer ``"a>b"`` (100 of them)."""
    from pte.models import char_tokenizer

    return char_tokenizer(extra_tokens=POINTERS)


@dataclass
class LongRange:
    hops: int = 6
    filler: int = 40
    filler_char: str = "."

    def __post_init__(self):
        if not 1 <= self.hops <= 9:
            raise ValueError(f"hops={self.hops}: must be in 1..9 (the pointers form a 10-cycle; 10 hops return to "
                             "the start)")
        if self.filler < 0:
            raise ValueError(f"filler={self.filler}: must be >= 0")

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            cycle = list(range(10))
            rng.shuffle(cycle)
            successor = {cycle[j]: cycle[(j + 1) % 10] for j in range(10)}
            listed = list(range(10))
            rng.shuffle(listed)
            start = rng.randrange(10)
            digits = self.follow(successor, start)
            question = " ".join(f"{a}>{successor[a]}" for a in listed) + f" start {start} ="
            out.append(Example(prompt=question, answer=str(digits[-1]), source=f"long_range(seed={seed})#{i}",
                               meta={"start": start, "successor": successor, "digits": digits}))
        return out

    def follow(self, successor: dict[int, int], start: int) -> list[int]:
        value, out = start, []
        for _ in range(self.hops):
            value = successor[value]
            out.append(value)
        return out

    def solution(self, example: Example) -> str:
        """The worked thought (what supervised pre-training imitates)."""
        digits = example.meta["digits"]
        return " " + " ".join(map(str, digits)) + f" a{digits[-1]} " + self.filler_char * self.filler + f" ans {digits[-1]}"

    def score(self, completion: str, example: Example) -> float:
        """1 if the last ``ans D`` is right *and* follows at least ``filler`` filler characters. Without the filler
        rule a policy trained with a window learns to skip the filler and copy ``a<d>`` from inside the window,
        which scores without memory (seen in the first GRPO runs)."""
        found = list(_ANS.finditer(completion))
        if not found or found[-1].group(1) != example.answer:
            return 0.0
        before = completion[:found[-1].start()].rstrip(" ")
        run = len(before) - len(before.rstrip(self.filler_char))
        return 1.0 if run >= self.filler else 0.0

    def thought_tokens_before_answer(self) -> int:
        """Tokens from the restated result to the final answer digit (one per character here)."""
        return len(" a0 ") + self.filler + len(" ans ")

    def check_difficulty(self, layers: int, window: int) -> None:
        """Raise if a plain sliding window could relay the result to the answer through the layers."""
        if self.filler <= layers * window:
            raise ValueError(f"filler={self.filler} <= layers x window = {layers} x {window}: cached keys/values can "
                             f"relay the answer forward about one window per layer; use filler > {layers * window}")
