"""A task a tiny random model can learn in a few dozen GRPO steps, to show the training loop works.

Prompt ``"d=7:"``; the reward is the mean over the first ``span`` completion characters of 1 for the prompt's
digit, ``other_digit`` for any other digit, 0 otherwise. Partial credit gives a random policy (about 1 character in
10 is a digit) a signal from the first steps. It tests the RL machinery, not memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pte.data import Example


@dataclass
class CopyDigit:
    span: int = 4
    other_digit: float = 0.1

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            d = str(rng.randrange(10))
            out.append(Example(prompt=f"d={d}:", answer=d, source=f"copy_digit(seed={seed})#{i}"))
        return out

    def score(self, completion: str, example: Example) -> float:
        head, answer = completion[: self.span].ljust(self.span), example.answer
        return sum(1.0 if ch == answer else self.other_digit if ch.isdigit() else 0.0 for ch in head) / self.span
