"""A task a tiny random model can learn in a few dozen GRPO steps, to show the training loop works.

Prompt ``"d=7:"``; the reward is the fraction of the first ``span`` completion characters equal to the digit.
Partial credit gives a random policy a signal from the first step. It tests the RL machinery, not memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pte.data import Example


@dataclass
class CopyDigit:
    span: int = 4

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            d = str(rng.randrange(10))
            out.append(Example(prompt=f"d={d}:", answer=d, source=f"copy_digit(seed={seed})#{i}"))
        return out

    def score(self, completion: str, answer: str) -> float:
        head = completion[: self.span]
        return sum(ch == answer for ch in head) / self.span
