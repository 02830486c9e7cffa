"""Loading causal LMs and tokenizers, and building tiny ones in code (tests, benchmarks, the demo).

No weights are ever downloaded by pte itself: a hub name works only where the hub is reachable.
``trust_remote_code`` is never set.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
SPECIALS = ("<pad>", "<eos>", "<bos>")


def char_tokenizer(extra_tokens: tuple[str, ...] = (),
                   appended_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids 0..2 are <pad>, <eos>, <bos>), built offline. ``extra_tokens``: multi-
    character strings that become single tokens (ids after the specials), matched before single characters;
    ``appended_tokens`` likewise, with ids after the characters (so adding them moves no other id)."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(extra_tokens) + tuple(CHARS) + tuple(appended_tokens))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    multi = sorted((*extra_tokens, *appended_tokens), key=len, reverse=True)
    pattern = "|".join([re.escape(t) for t in multi] + ["."])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_config(arch: str = "llama", *, vocab_size: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 8192,
                attn: str = "sdpa", init_std: float = 0.02):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=max_positions, initializer_range=init_std, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    cfg._attn_implementation = attn
    return cfg


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", **kwargs):
    """A randomly initialised causal LM of the given family, in eval mode, in ``dtype`` on ``device``. A seed gives
    the fp32 model's weights rounded to bf16/fp16; RoPE's buffers stay fp32, as ``from_pretrained`` leaves them."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kwargs)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation, dtype=dtype)
    return model.to(device).eval()


def check_family(model) -> None:
    family = getattr(model.config, "model_type", "?")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model family {family!r} is not supported; pte supports {', '.join(SUPPORTED_FAMILIES)} "
            "(decoder-only RoPE models with a standard KV cache)"
        )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, relative with ./ or ../, ~, or more than one '/'."""
    return not _HUB_ID.match(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_device(device: str, flag: str = "--device") -> torch.device:
    """A device this torch build can use, before any weight loads."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"{flag} {device}: this torch build has no CUDA support (a CPU wheel); use {flag} cpu or "
                             "install a CUDA build (make setup TORCH_PIP_ARGS=...)")
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA device is visible; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    return dev


def check_positions(model, prompt_tokens: int, max_new_tokens: int, flag: str = "--max-new-tokens") -> None:
    """Refuse, before generating, a prompt plus completion the model has no positions for (the last sampled token
    is never fed, so ``prompt + max_new_tokens - 1`` positions are used)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    if prompt_tokens > limit:
        raise ValueError(f"a prompt of {prompt_tokens} tokens is longer than the model's maximum ({limit} positions, "
                         "max_position_embeddings); shorten it")
    if prompt_tokens + max_new_tokens - 1 > limit:
        raise ValueError(f"{flag} {max_new_tokens}: a {prompt_tokens}-token prompt plus {max_new_tokens} new tokens "
                         f"needs {prompt_tokens + max_new_tokens - 1} positions, more than the model's {limit} "
                         f"(max_position_embeddings); lower {flag} to {limit - prompt_tokens + 1} or less")


def load(name_or_path: str, *, dtype: str = "auto", device: str = "cpu", attn: str = "sdpa"):
    """-> (model, tokenizer). ``name_or_path``: a directory saved with ``save_pretrained`` or a hub name."""
    check_device(device)
    local = Path(name_or_path).expanduser()
    if local.is_file():
        raise ValueError(f"model {name_or_path} is a file; pass the directory written by save_pretrained (the one "
                         "holding config.json)")
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"{name_or_path}: no config.json there; expected a directory written by save_pretrained")
    if not local.exists() and looks_local(name_or_path):
        raise FileNotFoundError(f"model {name_or_path}: no such directory; pass a directory written by "
                                "save_pretrained (or a hub name such as Qwen/Qwen2.5-0.5B where the hub is reachable)")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    source = str(local) if local.exists() else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn)
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors' own error type, ...
        if not local.exists():
            raise ValueError(f"model {name_or_path}: not a local directory and not loadable from the hub "
                             f"({_first_line(exc)}); pass a directory written by save_pretrained") from None
        raise ValueError(f"model {name_or_path}: could not read its weights ({type(exc).__name__}: {_first_line(exc)}); "
                         "the files are damaged or incomplete: save or copy the model again") from None
    check_family(model)
    return model.to(device).eval(), load_tokenizer(source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def load_tokenizer(name_or_path: str):
    """AutoTokenizer, except for a generic ``tokenizer.json`` saved without a model-specific class: transformers 5
    would map it to the model family's tokenizer class and replace its pre-tokenizer; load it as it was saved."""
    config = Path(name_or_path) / "tokenizer_config.json"
    if config.exists():
        import json

        if json.loads(config.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)
