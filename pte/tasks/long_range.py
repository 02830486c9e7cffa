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

**The distance variant** (``countdown=N``, for generation-length scaling as in the paper's Fig. 5): the filler is
a countdown of ``N`` blocks, each a counter token then dots (``#02... #01... #00...``, :data:`COUNTERS`), and the
question names the counter before the first (``... start 4 #03 =``). Each block's counter is the last counter
written minus one, the prompt's included: one lookup the window always sees, so a model can write a filler of any
length it was pre-trained on without counting beyond its window, and the distance between ``aD`` and its use is
set by the question alone. (When the question named the first counter itself, the base learnt the decrement but
not the copy: docs/ablations.md, "Reasoning length".) The verifier asks for the whole countdown, exactly, before
``ans D``. It needs :func:`tokenizer` with ``countdown=True``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pte.data import Example

_ANS = re.compile(r"ans (\d)")
POINTERS = tuple(f"{a}>{b}" for a in range(10) for b in range(10))
COUNTERS = tuple(f"#{c:02d}" for c in range(100))  # the distance variant's countdown
MAX_COUNTDOWN = len(COUNTERS) - 1  # the question names the counter before the first


def tokenizer(countdown: bool = False):
    """Character-level, plus one token per pointer ``"a>b"`` (100 of them) and, for the distance variant, one per
    counter ``#00``..``#99`` (after the characters, so the plain task's ids do not move)."""
    from pte.models import char_tokenizer

    return char_tokenizer(extra_tokens=POINTERS, appended_tokens=COUNTERS if countdown else ())


@dataclass
class LongRange:
    hops: int = 6
    filler: int = 40
    filler_char: str = "."
    countdown: int | None = None  # the distance variant: a filler of this many counted blocks (replaces filler)
    block: int = 4  # tokens per countdown block: the counter, then block - 1 filler characters

    def __post_init__(self):
        if not 1 <= self.hops <= 9:
            raise ValueError(f"hops={self.hops}: must be in 1..9 (the pointers form a 10-cycle; 10 hops return to "
                             "the start)")
        if self.filler < 0:
            raise ValueError(f"filler={self.filler}: must be >= 0")
        if self.countdown is not None and not 1 <= self.countdown <= MAX_COUNTDOWN:
            raise ValueError(f"countdown={self.countdown}: must be in 1..{MAX_COUNTDOWN} (one counter token per block, "
                             "and one for the question)")
        if self.block < 1:
            raise ValueError(f"block={self.block}: must be >= 1 (the counter token itself)")

    @property
    def filler_text(self) -> str:
        """What the thought writes between ``aD`` and ``ans D``."""
        if self.countdown is None:
            return self.filler_char * self.filler
        return "".join(COUNTERS[c] + self.filler_char * (self.block - 1) for c in reversed(range(self.countdown)))

    @property
    def filler_tokens(self) -> int:
        return self.filler if self.countdown is None else self.countdown * self.block

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
            counter = "" if self.countdown is None else f" {COUNTERS[self.countdown]}"
            question = " ".join(f"{a}>{successor[a]}" for a in listed) + f" start {start}{counter} ="
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
        return " " + " ".join(map(str, digits)) + f" a{digits[-1]} " + self.filler_text + f" ans {digits[-1]}"

    def score(self, completion: str, example: Example) -> float:
        """1 if the last ``ans D`` is right *and* follows at least ``filler`` filler characters. Without the filler
        rule a policy trained with a window learns to skip the filler and copy ``a<d>`` from inside the window,
        which scores without memory (seen in the first GRPO runs). The distance variant asks for the whole
        countdown instead."""
        found = list(_ANS.finditer(completion))
        if not found or found[-1].group(1) != example.answer:
            return 0.0
        before = completion[:found[-1].start()].rstrip(" ")
        if self.countdown is not None:
            return 1.0 if before.endswith(self.filler_text) else 0.0
        run = len(before) - len(before.rstrip(self.filler_char))
        return 1.0 if run >= self.filler else 0.0

    def thought_tokens_before_answer(self) -> int:
        """Tokens from the restated result to the final answer digit (one per character, or per counter)."""
        return len(" a0 ") + self.filler_tokens + len(" ans ")

    def check_difficulty(self, layers: int, window: int) -> None:
        """Raise if a plain sliding window could relay the result to the answer through the layers."""
        if self.filler_tokens <= layers * window:
            what = f"filler={self.filler}" if self.countdown is None else \
                f"countdown={self.countdown} x block={self.block} = {self.filler_tokens} tokens"
            raise ValueError(f"{what} <= layers x window = {layers} x {window}: cached keys/values can relay the "
                             f"answer forward about one window per layer; make the filler longer than "
                             f"{layers * window} tokens")
