"""What a second actor on a node saves: compile warm-up in fresh processes sharing one compile cache.

Each actor is a fresh process that loads the model and compiles it at start (`Engine.warmup`). torch keeps
compiled graphs on disk (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), so actors on one node
share them. This script saves a model once, then starts `--processes` fresh processes one after another on
an empty cache folder: the first compiles (the anchor of the table), the others should load from the cache.

    python -m scripts.bench_compile_cache                                   # MiniLM-L6 shape, CPU
    python -m scripts.bench_compile_cache --model bert-base --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_ACTOR = """
import json, sys, time
t0 = time.perf_counter()
from kernels.engine import Engine, EngineConfig
eng = Engine.from_pretrained(sys.argv[1], EngineConfig(engine=sys.argv[2], device=sys.argv[3], dtype=sys.argv[4],
                                                      compile=True))
load = time.perf_counter() - t0
warm = eng.warmup()
print(json.dumps({"load_s": load, "warmup_s": warm, **eng.compile_cache, "attention": eng.attention_backend}))
"""


def save_model(shape: str, folder: str) -> str:
    from jobs import bench_data as bd, bench_models as bm

    if os.path.isdir(shape):
        return shape
    tok = bd.build_tokenizer(bm.TOKENIZER_FOR_FAMILY[bm.SHAPES[shape]["family"]])
    model = bm.build_model(shape, tok)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", help="a jobs.bench_models shape or a local model folder")
    ap.add_argument("--engine", default="packed", choices=["packed", "padded"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="crossrank-cc-") as tmp:
        model = save_model(args.model, os.path.join(tmp, "model"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}  # empty: a fresh node
        rows = []
        for i in range(args.processes):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _ACTOR, model, args.engine, args.device, args.dtype],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append({"process": i + 1, "wall_s": time.perf_counter() - t0,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
    first = rows[0]["warmup_s"]
    print(f"{args.model}, {args.engine}, {args.device} {args.dtype}, cache folder empty before process 1")
    print(f"{'process':>7} {'load s':>7} {'warm-up s':>9} {'x first':>7} {'cache hits':>10} {'misses':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['process']:>7} {r['load_s']:>7.1f} {r['warmup_s']:>9.1f} {r['warmup_s'] / first:>7.2f} "
              f"{r['hits']:>10} {r['misses']:>6} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
