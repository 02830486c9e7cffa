"""A long-range reasoning task: the answer is written early in the model's own thought and needed only at the end.

Question: a start digit and ``n_ops`` mod-10 operations, e.g. ``"4 *3 +7 *9 +2 *1 +5 ="``. Multipliers are drawn
from {1, 3, 7, 9} (units mod 10), so every intermediate digit, and the answer, is uniform over 0-9. The worked
thought writes each intermediate digit, restates the result as ``a8``, then a filler stretch of ``filler``
characters, then ``ans 8``:

    "4 *3 +7 *9 +2 *1 +5 =" -> " 2 9 1 3 3 8 a8 ............................ ans 8"

The filler carries no information, so at ``ans`` the result survives only in what the cache kept. With a sliding
window shorter than the filler, the restated ``a8`` has been evicted; keys and values can still relay information
forward by about one window per layer, so the filler must be longer than ``layers x window`` for the task to test
memory (:meth:`LongRange.check_difficulty`). A full cache solves it; a plain sliding window cannot; PTE's state
can, if it keeps what was evicted.

Verification is exact: the last ``ans D`` of the completion must be the answer digit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pte.data import Example

_ANS = re.compile(r"ans (\d)")


@dataclass
class LongRange:
    n_ops: int = 6
    filler: int = 28
    filler_char: str = "."

    def __post_init__(self):
        if self.n_ops < 1:
            raise ValueError(f"n_ops={self.n_ops}: at least one operation")
        if self.filler < 0:
            raise ValueError(f"filler={self.filler}: must be >= 0")

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            start = rng.randrange(10)
            ops = [("*", rng.choice((1, 3, 7, 9))) if rng.random() < 0.5 else ("+", rng.randrange(10))
                   for _ in range(self.n_ops)]
            question = f"{start} " + " ".join(f"{op}{k}" for op, k in ops) + " ="
            digits = self.intermediates(start, ops)
            out.append(Example(prompt=question, answer=str(digits[-1]), source=f"long_range(seed={seed})#{i}",
                               meta={"start": start, "ops": ops, "digits": digits}))
        return out

    @staticmethod
    def intermediates(start: int, ops: list[tuple[str, int]]) -> list[int]:
        value, out = start, []
        for op, k in ops:
            value = (value * k) % 10 if op == "*" else (value + k) % 10
            out.append(value)
        return out

    def solution(self, example: Example) -> str:
        """The worked thought (what supervised pre-training imitates)."""
        digits = example.meta["digits"]
        return " " + " ".join(map(str, digits)) + f" a{digits[-1]} " + self.filler_char * self.filler + f" ans {digits[-1]}"

    def score(self, completion: str, example: Example) -> float:
        found = _ANS.findall(completion)
        return 1.0 if found and found[-1] == example.answer else 0.0

    def thought_tokens_before_answer(self) -> int:
        """Characters (= tokens, char-level) from the restated result to the final answer digit."""
        return len(" a0 ") + self.filler + len(" ans ")

    def check_difficulty(self, layers: int, window: int) -> None:
        """Raise if a plain sliding window could relay the result to the answer through the layers."""
        if self.filler <= layers * window:
            raise ValueError(f"filler={self.filler} <= layers x window = {layers} x {window}: cached keys/values can "
                             f"relay the answer forward about one window per layer; use filler > {layers * window}")
