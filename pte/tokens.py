"""Which token ids end a completion and which pad a batch: one rule for train, generate and eval.

Chat models often end a turn with an id that is not the tokenizer's EOS (e.g. ``<|im_end|>`` or
``<|eot_id|>``) but is listed in the model's generation config; training rollouts must stop where generation
does, or they run past the turn's end.
"""

from __future__ import annotations


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus the generation config's EOS ids, sorted."""
    eos: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if source is not None:
            eos.update(source if isinstance(source, (list, tuple)) else [source])
    return tuple(sorted(eos))


def pad_token_id(tokenizer, stop_ids: tuple[int, ...] = ()) -> int:
    """The tokenizer's pad id, else the smallest stop id, else 0. Pads are masked out, so any id is exact."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(stop_ids) if stop_ids else 0
