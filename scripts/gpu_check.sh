#!/usr/bin/env bash
# GPU self-check: run on a fresh GPU machine before a long run. Under 10 minutes on one GPU, no network:
# every model is random and built in-process. Prints one table (tests/gpu + throughput) and exits 1 on a failure.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: a fresh temporary dir; logs and the JUnit XML stay there)
#
# A machine without network: on a machine with network and the same Python version and CUDA, download the wheels
#   pip download -r requirements.txt -d wheels/ [flash-attn]
# (add --platform manylinux2014_x86_64 --python-version 3.11 --only-binary=:all: when that machine differs),
# copy wheels/ over, and install from it alone:
#   pip install --no-index --find-links wheels/ -r requirements.txt && pip install --no-index --find-links wheels/ -e .
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d -t lmsys_gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== tests/gpu (log: $OUT/pytest.log)"
timeout 420 python -m pytest tests/gpu -m gpu -q -n 0 -p no:cacheprovider --junitxml "$OUT/junit.xml" > "$OUT/pytest.log" 2>&1 || true

echo "== throughput: random ~1B Llama, NF4 QLoRA, bf16, padded vs packed (log: $OUT/bench.log)"
python scripts/gpu_bench_inputs.py "$OUT" > "$OUT/inputs.log" 2>&1
timeout 300 python -m lmsys.bench --config-name conf_r_llama_smol model.path="$OUT/llama1b" \
    data.train_path="$OUT/pairs.csv" bench.n_pairs=128 bench.modes=[padded,packed] model.compute_dtype=bfloat16 \
    model.max_length=2048 trainer.max_tokens=16384 trainer.eval_max_tokens=16384 trainer.batch_size=8 trainer.grad_accum=2 \
    > "$OUT/bench.log" 2>&1 || true

echo "== $(date -u +%F) $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
python -m lmsys.selfcheck --junit "$OUT/junit.xml" --bench "$OUT/bench.log"
