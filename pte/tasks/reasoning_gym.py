"""``reasoning-gym`` generators (seeded, with their own scorers) as an endless training source.

``data.task: reasoning_gym`` with ``data.task_options: {name: chain_sum, config: {...}}``. The completion's final
answer (last ``\\boxed{}``, "the answer is ...", or the last number; else the whole stripped text) is scored by
the generator's own ``score_answer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pte.data import Example
from pte.rewards import extract_answer


@dataclass
class ReasoningGym:
    name: str = "chain_sum"
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self._dataset = None

    def examples(self, n: int, seed: int) -> list[Example]:
        import reasoning_gym

        try:
            self._dataset = reasoning_gym.create_dataset(self.name, size=n, seed=seed, **self.config)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"reasoning_gym task {self.name!r} with config {self.config}: {exc}") from None
        return [Example(prompt=e["question"], answer=str(e["answer"]), source=f"reasoning_gym:{self.name}(seed={seed})#{i}",
                        meta=e) for i, e in enumerate(self._dataset)]

    def score(self, completion: str, example: Example) -> float:
        pred = extract_answer(completion)
        pred = pred if pred is not None else completion.strip()
        return float(self._dataset.score_answer(pred, example.meta))
