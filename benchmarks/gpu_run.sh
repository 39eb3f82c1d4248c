#!/usr/bin/env bash
# The GPU checks and measurements the open work needs, one named step per call (each ends inside 10 minutes), with
# every log written under OUT (default benchmarks/results/gpu_run). Run from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_run.sh STEP [OUT]
#
# Steps, most needed first:
#   fit-test          whole `fit` + `validate` of the Enwik8 and CIFAR-10 configs (shrunk) with CUDA graphs
#   train-step        sparse against dense, CUDA graphs: CIFAR-10, Enwik8, ImageNet 64, audio 65,536 (one run)
#   ordered-ab        the 5-product backwards: the Enwik8 step with ordered dK/dV and with ordered dQ (segments of
#                     1,024 rows) against the default, then the attention rows (Enwik8 shape, n = 16,384) from CUDA graphs
#   sweep-enwik8      tile sweep of the Enwik8 shape (the candidates include both 5-product designs), CUDA graphs,
#                     then the Enwik8 step with the sweep's tiles against the defaults and dense (train_step --tiles)
#   sweep-cifar10     tile sweep of the CIFAR-10 shape (d_qk 64, d_v 128), CUDA graphs
#   train-long        audio 262,144 and 1,048,576, sparse with CUDA graphs (and dense 262,144 where it fits)
#   attention-graphs  the paper shapes timed from captured CUDA graphs (kernel time, no host time), no Flex
#   attention         benchmarks/attention.py's main table (issue 9's d=64 targets), SDPA and Flex
#   attention-paper   the paper configs' shapes, SDPA and Flex (Flex compiles ≈ 6 min of it on an H100)
#   sweep-w32         tile sweep of the head-width-32 paper shapes (ImageNet 64, audio 65,536)
#   suite-kernels     the kernels' GPU tests (tests/test_gpu_attention.py)
#   suite-rest        the other GPU tests (training, sampling)
#   ncu-fixed         Nsight Compute of the fixed pattern's backward (default, ordered dK/dV) and forward, Enwik8 shape
#   ncu-strided       Nsight Compute of Strided(128)'s two backward and two forward launches, n = 16,384, batch 16
#
# On a machine without network, wheels of what it lacks (e.g. jsonargparse, docstring-parser, typeshed-client for
# the CLI) placed in .whl/ are installed into /tmp/site first.
set -euo pipefail
step=${1:?usage: bash benchmarks/gpu_run.sh STEP [OUT] (steps are listed at the top of this file)}
out=${2:-benchmarks/results/gpu_run}
steps=" fit-test train-step ordered-ab sweep-enwik8 sweep-cifar10 train-long attention-graphs attention attention-paper sweep-w32 suite-kernels suite-rest
    ncu-fixed ncu-strided "
if [[ $steps != *" $step "* ]]; then
    echo "unknown step '$step'; the steps are:$steps(see the top of benchmarks/gpu_run.sh)" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# editable, so that pytest run from the root and the installed package are the same files
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"

run() {  # run NAME SECONDS CMD...: the command's output to OUT/NAME.log, stopped after SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || echo "== $name ended with status ${PIPESTATUS[0]}"
}

ncu_kernel() {  # ncu_kernel NAME KERNEL SKIP COUNT ARGS...: Nsight Compute of COUNT launches of KERNEL after SKIP
    local name=$1 kernel=$2 skip=$3 count=$4 ncu
    shift 4
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    run "$name" 280 "$ncu" --kernel-name "$kernel" --launch-skip "$skip" --launch-count "$count" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
        python3 benchmarks/ncu_attention.py "$@"
}

case $step in
fit-test)
    run fit_test 540 python3 -m pytest -m gpu tests/test_gpu_fit_cudagraphs.py -q -s -x ;;
train-step)
    run train_step 560 python3 benchmarks/train_step.py --configs cifar10,enwik8,imagenet64,audio_65k \
        --variants sparse-cudagraphs,dense-cudagraphs --top-kernels 6 --gaps 6 --out "$out/train_step" ;;
ordered-ab)
    run train_step_ordered 240 python3 benchmarks/train_step.py --configs enwik8 --variants \
        sparse-cudagraphs,sparse-cudagraphs+ordered-kv,sparse-cudagraphs+ordered-dq --segment 1024 --top-kernels 3 \
        --out /tmp/ts_ordered
    for design in "" --ordered-kv "--ordered-dq --segment 1024"; do
        run "attention_fixed${design// /_}" 90 python3 benchmarks/attention.py --paper-shapes enwik8 --ns 16384 \
            --scaling-ns "" --no-flex --cuda-graphs $design
    done ;;
sweep-enwik8)
    run sweep_enwik8 560 python3 benchmarks/attention.py --sweep --paper-shapes enwik8 --paper-shapes-only --no-flex \
        --cuda-graphs --json "$out/sweep_enwik8.json"
    run ts_enwik8 200 python3 benchmarks/train_step.py --configs enwik8 --variants sparse-cudagraphs,dense-cudagraphs \
        --top-kernels 4 --out "$out/ts_enwik8"
    run ts_enwik8_swept 150 python3 benchmarks/train_step.py --configs enwik8 --variants sparse-cudagraphs \
        --top-kernels 4 --tiles "$out/sweep_enwik8.json" --out "$out/ts_enwik8_swept" ;;
sweep-cifar10)
    run sweep_cifar10 560 python3 benchmarks/attention.py --sweep --paper-shapes cifar10 --paper-shapes-only \
        --no-flex --cuda-graphs --json "$out/sweep_cifar10.json" ;;
train-long)
    run train_long 560 python3 benchmarks/train_step.py --configs audio_262k,audio_1m \
        --variants sparse-cudagraphs,dense-cudagraphs --out "$out/train_long" ;;
attention-graphs)
    run attention_graphs 560 python3 benchmarks/attention.py --paper-shapes-only --no-flex --cuda-graphs \
        --json "$out/attention_graphs.json" ;;
attention)  # the whole script in one run passed 10 minutes on an H100 (Flex compiling): two steps
    run attention 580 python3 benchmarks/attention.py --paper-shapes "" --json "$out/attention.json" ;;
attention-paper)
    run attention_paper 580 python3 benchmarks/attention.py --paper-shapes-only --json "$out/attention_paper.json" ;;
sweep-w32)
    run sweep_w32 560 python3 benchmarks/attention.py --sweep --paper-shapes-only --paper-shapes imagenet64,audio65k \
        --no-flex --json "$out/sweep_w32.json" ;;
suite-kernels)
    GPU_ERR_LOG=$out/gpu_errors.txt run suite_kernels 570 python3 -m pytest -m gpu tests/test_gpu_attention.py -q ;;
suite-rest)
    run suite_rest 570 python3 -m pytest -m gpu -q --ignore=tests/test_gpu_attention.py \
        --ignore=tests/test_gpu_fit_cudagraphs.py --ignore=tests/test_gpu_multi.py ;;
ncu-fixed)
    ncu_kernel ncu_bwd _bwd_kernel 1 1
    ncu_kernel ncu_bwd_kv _bwd_kernel 1 1 --design kv
    ncu_kernel ncu_fwd _fwd_kernel 1 1 ;;
ncu-strided)  # the second repetition's two launches a direction (local band, then strided order)
    ncu_kernel ncu_strided_bwd _bwd_kernel 2 2 --pattern strided
    ncu_kernel ncu_strided_fwd _fwd_kernel 2 2 --pattern strided ;;
esac
