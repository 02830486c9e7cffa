#!/usr/bin/env bash
# One prepared GPU check (issue #12, item 6); about 6 minutes on one H200. Each stage has its own timeout and
# log under $OUT (default ./gpu_out) and the run continues after a failed stage; $OUT/summary.txt lists them.
#   scripts/gpu_check.sh              on a CUDA machine (PyTorch preinstalled; ./wheels/*.whl installed if present)
#   scripts/gpu_check.sh --cpu-smoke  tiny sizes on the CPU, to catch errors in this script without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SMOKE OUT
DEVICE=cuda
[[ $SMOKE == 1 ]] && DEVICE=cpu
export DEVICE
: > "$OUT/summary.txt"

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

if compgen -G "wheels/*.whl" > /dev/null && [[ $SMOKE == 0 ]]; then
    stage install 120 "$PY" -m pip install --no-deps --no-index wheels/*.whl
fi
stage env 60 bash -c "nvidia-smi || true; $PY -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())'"

# 1. the cache/replay exactness tests on the device (tests/conftest.py: PTE_TEST_DEVICE sets the default device)
TESTS="tests/test_cache.py tests/test_pte.py tests/test_rollout.py tests/test_device.py"
if [[ $SMOKE == 1 ]]; then
    stage tests_fp32 240 env PTE_TEST_DEVICE=cpu "$PY" -m pytest -q -x tests/test_cache.py -k "never_fills or full" -p no:cacheprovider
else
    stage tests_fp32 240 env PTE_TEST_DEVICE=cuda "$PY" -m pytest -q $TESTS -p no:cacheprovider
fi

# 2. bf16 on the device: bounded == full cache while the window never fills, and rollout vs replay log-probs
stage bf16_exactness 120 "$PY" - <<'PY'
import json, os, torch
from pte.adapter import AdapterConfig, attach
from pte.models import tiny_model
from pte.replay import replay
from pte.rollout import CacheSpec, Sampling, rollout
dev = torch.device(os.environ["DEVICE"])
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for method, window in (("lora", None), ("lora_c", 16), ("pte", 16)):
        model = tiny_model("qwen2", init_std=0.2, seed=1, dtype=dtype).to(dev)
        ad = attach(model, AdapterConfig(method=method, rank=8, n_global=8))
        g = torch.Generator(device=dev).manual_seed(0)
        try:
            res = rollout(model, [[5, 6, 7, 8]] * 4, Sampling(max_new_tokens=64), CacheSpec(window=window), generator=g, adapter=ad)
            rep = replay(model, res.rows, CacheSpec(window=window), adapter=ad)
            old = torch.tensor([r.logprobs for r in res.rows], device=dev)
            out[f"{method} {dtype}"] = float((rep.logprobs - old).abs().max())
        except Exception as e:
            out[f"{method} {dtype}"] = f"{type(e).__name__}: {str(e)[:200]}"
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ["OUT"], "bf16_exactness.json"), "w"), indent=1)
PY

# 3. 20 GRPO steps of PTE on the long-range task
SIZE=(--set run.steps=20)
[[ $SMOKE == 1 ]] && SIZE=(--set run.steps=2 --set grpo.group_size=2 --set grpo.prompts_per_step=1 --set sampling.max_new_tokens=12)
stage train_pte 180 "$PY" -m pte train --set model.name=pte/assets/long_range_base --set data.task=long_range \
    --set adapter.method=pte --set cache.window=8 --set model.device=$DEVICE "${SIZE[@]}" \
    --set run.out_dir="$OUT/train_pte" --set run.save_every=1000

# 4. the real training step of a random-initialised 7B-shaped model at 3072 tokens vs the fake-mode prediction
stage memory_7b 240 "$PY" - <<'PY'
import json, os, time, torch
from pte.lab import paper_memory as pm
from pte.adapter import AdapterConfig, attach
from pte.models import tiny_config
smoke = os.environ["SMOKE"] == "1"
dev = torch.device(os.environ["DEVICE"])
name, length, window, rows, prompt = "Qwen2.5-7B-Instruct", 3072, 1024, 4, 256
cfg_of = (lambda n: pm.paper_config(name, n))
if smoke:
    length, window, rows, prompt = 48, 16, 2, 8
    cfg_of = (lambda n: tiny_config("qwen2", vocab_size=128, hidden=64, layers=n, heads=4, kv_heads=2))
full_layers = 2 if smoke else pm.paper_config(name).num_hidden_layers
out = []
for method in ("lora_c", "pte", "lora"):
    t0 = time.time()
    pred = pm.extrapolate(lambda layers, rows: pm.step_memory(cfg_of(layers), method, length, window, rows, prompt),
                          dict(layers=full_layers, rows=rows), {"layers": (1, 2)})
    rec = {"method": method, "rows": rows, "length": length, "predicted_train_bytes": pred["static"] + pred["train"],
           "predict_s": time.time() - t0}
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg_of(full_layers), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        ad = attach(model, AdapterConfig(method=method, rank=32, n_global=32))
        opt = torch.optim.Adam(ad.parameters(), lr=1e-6)
        for p in ad.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(); opt.zero_grad(set_to_none=True)
        batch = pm._rows(rows, prompt, length, None if method == "lora" else window)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t1 = time.time()
        try:
            with pm.PromoteMatmuls():  # the same stand-in for the bf16 state fix as the prediction
                pm.training_step(model, ad, opt, method, batch, None if method == "lora" else window, dev)
            torch.cuda.synchronize()
            rec |= {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(), "step_s": time.time() - t1}
            rec["ratio_real_over_predicted"] = rec["cuda_max_allocated_bytes"] / rec["predicted_train_bytes"]
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del model, ad, opt
    print(json.dumps(rec), flush=True)
    out.append(rec)
json.dump(out, open(os.path.join(os.environ["OUT"], "memory_7b.json"), "w"), indent=1)
PY

# 5. rollout tokens/s, random-initialised 0.5B-shaped model, batch 64, 1024 tokens: ours bounded / full vs generate
stage rollout_speed 240 "$PY" - <<'PY'
import json, os, time, torch
from transformers import AutoModelForCausalLM, Qwen2Config
from pte.rollout import CacheSpec, Sampling, rollout
smoke = os.environ["SMOKE"] == "1"
dev = torch.device(os.environ["DEVICE"])
shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
batch, length, prompt, window = 64, 1024, 64, 256
if smoke:
    shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    batch, length, prompt, window = 2, 40, 8, 16
torch.manual_seed(0)
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
ids = torch.randint(3, shape["vocab_size"], (batch, prompt), device=dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
def run(engine, n):
    g = torch.Generator(device=dev).manual_seed(0)
    if engine == "hf_generate":
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                       top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    else:
        rollout(model, ids.tolist(), Sampling(max_new_tokens=n), CacheSpec(window=None if engine == "ours_full" else window),
                generator=g)
out = []
with torch.no_grad():
    for engine in ("hf_generate", "ours_full", "ours_bounded"):
        try:
            run(engine, 16); sync(); t0 = time.perf_counter(); run(engine, length); sync()
            s = time.perf_counter() - t0
            rec = {"engine": engine, "batch": batch, "length": length, "window": window, "seconds": s, "tokens_per_s": batch * length / s}
        except Exception as e:
            rec = {"engine": engine, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(rec), flush=True)
        out.append(rec)
json.dump(out, open(os.path.join(os.environ["OUT"], "rollout_speed.json"), "w"), indent=1)
PY

echo "done; logs in $OUT" | tee -a "$OUT/summary.txt"
