#!/usr/bin/env bash
# crossrank GPU check, one command, bounded in time (see scripts/gpu_check.py for the steps):
#   (1) CPU tokenize+assemble throughput, (2) fp16/bf16 score precision vs fp32 for the packed and padded
#   engines, (3) the bench matrix for the MiniLM-L6, XLM-R-large and ModernBERT-base shapes against
#   sentence-transformers.
#
#   bash scripts/gpu_check.sh                  # from the repo root; files under $OUT if set, else bench_out/
#   bash scripts/gpu_check.sh --budget-s 300   # any scripts/gpu_check.py option passes through
#   bash scripts/gpu_check.sh --smoke          # CPU dry run
#
# The Python side keeps to --budget-s (default 420 s); this wrapper stops it for good at GPU_CHECK_LIMIT_S
# (default 470 s, 900 s with --smoke: SIGINT first, which still writes the tables, then SIGKILL 15 s later).
# Needs only python with torch, transformers, sentence-transformers, numpy, pyarrow. Nothing is downloaded.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-bench_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
LIMIT="${GPU_CHECK_LIMIT_S:-470}"
# The CPU dry run is not the timed GPU check: give a busy 2-core box room (seen: 472 s with tests beside it).
case " $* " in *" --smoke "*) LIMIT="${GPU_CHECK_LIMIT_S:-900}" ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
{
  echo "# $(date -u +%FT%TZ) $(hostname) $($PY --version 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
} > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"
timeout --signal=INT --kill-after=15 "$LIMIT" "$PY" scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check exit code $rc; files in $OUT_DIR:"
ls -la "$OUT_DIR"
exit "$rc"
