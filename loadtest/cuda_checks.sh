#!/usr/bin/env bash
# What only a CUDA machine can check, in one go; each step's log (and JSON) goes to OUT_DIR:
#
#   bash loadtest/cuda_checks.sh OUT_DIR [STEP ...]
#       steps: tests model8b bench8b profile8b (the default, about 9 minutes on an H200), kernels http
#
#   tests    compiled Triton kernels (LoRA, paged decode attention) vs the oracle; the engine on CUDA (nf4 and fp32
#            base, mixed adapters, evictions, decode steps from CUDA graphs) vs PEFT token for token; graph replays
#            vs the same decode path run eagerly with 0, 8 and 32 adapters and an adapter swap between replays;
#            structured outputs' masks on graph-replayed logits and the logits processors on the device;
#            DoRA and lora_bias adapters on an nf4 base vs PEFT; QLoRA training on the GPU (test_train.py)
#   model8b  an 8B-shaped Llama (Llama-3-8B's config) with random bf16 weights, in $LORADOCK_BENCH_MODEL
#            (default /dev/shm/loradock-llama-3-8b; kept for reruns; LORADOCK_BENCH_SHAPE picks another shape)
#   bench8b  lora_bench on it, nf4: 0, 8 and 32 adapters of rank 16 at concurrency 32, CUDA graphs on, then off
#   profile8b  step_profile on it, 32 adapters, graphs on and off: per decode step the wall time, the device's
#            span (CUDA events) and the host's share, then device kernel time and the profile's top kernels
#   kernels  kernel_bench: the Triton kernel on 8B decode shapes, next to the base nf4 / bf16 layer
#   http     `loradock serve --model tiny-random` (nf4, bf16) + `loradock loadtest`: the CPU headline workload
#            (8 adapters, 96 requests at concurrency 32, 64 tokens, streamed) over HTTP on the GPU
set -uo pipefail
out=${1:?usage: cuda_checks.sh OUT_DIR [STEP ...]}
shift
steps=${*:-tests model8b bench8b profile8b}
mkdir -p "$out"
shape=${LORADOCK_BENCH_SHAPE:-llama-3-8b}  # llama-mini: the same pipeline small enough for a CPU dry run
model8b=${LORADOCK_BENCH_MODEL:-/dev/shm/loradock-$shape}
failed=()

run() {  # run NAME LIMIT_S COMMAND...: the command's output to the terminal and NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || failed+=("$name")
}

http_check() {  # the headline workload over HTTP against `loradock serve` on the GPU
    local adapters=/tmp/loradock-cuda-http-adapters port=8811
    [ -d "$adapters/adapter-7" ] ||
        python -m loradock.loadtest.random_adapters --model tiny-random --out "$adapters" --count 8 --rank 16
    python -m loradock serve --model tiny-random --adapters "$adapters" --max-gpu-adapters 8 --port $port \
        >"$out/http-server.log" 2>&1 &
    local server=$!
    python -c "import time, urllib.request as u
for _ in range(300):
    try: u.urlopen('http://127.0.0.1:$port/health', timeout=2); break
    except OSError: time.sleep(0.5)"
    python -m loradock loadtest --url "http://127.0.0.1:$port" --adapters-dir "$adapters" \
        --distribution distinct --concurrency 32 --requests 96 --max-tokens 64 --warmup 32 --quiet \
        --out "$out/http.json"
    local rc=$?
    kill "$server"
    wait "$server"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"

for step in $steps; do
    case $step in
    tests) run tests 270 python -m pytest -q -p no:cacheprovider tests/kernels tests/serve/engine/test_cuda.py \
               tests/serve/engine/test_dora_engine.py tests/serve/engine/test_vocab_targets_engine.py \
               tests/serve/engine/test_grammar.py \
               tests/serve/engine/test_logits_processors.py tests/train/test_train.py -k "triton or paged or cuda or (test_train and not torchrun)" ;;
    kernels) run kernels 150 python -m loradock.loadtest.kernel_bench --json "$out/kernels.json" ;;
    model8b) [ -f "$model8b/config.json" ] ||
                 run model8b 200 python -m loradock.loadtest.random_model --shape "$shape" --out "$model8b" ;;
    bench8b) for graphs in cuda-graphs no-cuda-graphs; do
                 run "bench8b-$graphs" 150 python -m loradock.loadtest.lora_bench --model "$model8b" --device cuda \
                     --quantize nf4 --adapter-counts 0,8,32 --concurrency 32 --requests 64 --no-peft --"$graphs" \
                     --json "$out/bench8b-$graphs.json"
             done ;;
    profile8b) for graphs in cuda-graphs no-cuda-graphs; do
                   run "profile8b-$graphs" 120 python -m loradock.loadtest.step_profile --model "$model8b" \
                       --device cuda --adapters 32 --requests 32 --rows 12 --"$graphs"
               done ;;
    http) export out; export -f http_check; run http 150 bash -c http_check ;;
    *) echo "unknown step $step"; failed+=("$step") ;;
    esac
done
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
