#!/usr/bin/env bash
# Every check that needs a CUDA device, in one command, each step bounded in time, logs in one folder.
#
#   bench/gpu_checks.sh DATA_ROOT STEP...     on the GPU host, from the repository root
#   bench/gpu_checks.sh wheels DIR PYVER      here, first, for a GPU host with no package index
#
# DATA_ROOT is a folder of Fashion-MNIST's four IDX .gz files. Logs and results go to $OUT (default
# out/gpu), one file per step, flat. The steps, in the order they are worth running:
#   tests        the tests marked gpu (the compiled bf16 fast path, the codecs on CUDA)         ~2 min
#   throughput   python -m bench.train_throughput: paper loop against fast path, compile and
#                round seconds, the 200-step loss check (docs/benchmarks.md, GPU)              ~3-5 min
#   ranks        the same trainer as one rank under torch's launcher, against the one process  ~2 min
#   repro-a      feddiff reproduce --protocol quick: centralised, full, usplit (IID)            ~5 min
#   repro-b      the same for ulatdec and udec; with repro-a, the quick IID row of docs/results.md
# A step's seconds come from STEP_SECONDS_<step> (default 540); a step that runs out is stopped and
# the next one starts. The reproduction runs in $REPRO_DIR (default runs/reproduce/quick: keep it between calls
# to resume); its results.jsonl and the cells' sample grids (grids.tar) are copied to $OUT. REPRO_PROTOCOL=mini REPRO_DEVICE=cpu
# tries the steps' mechanics on a CPU in a minute.
#
# `wheels` fills DIR with the wheels feddiff needs beyond PyTorch's usual stack (for a host that has torch,
# numpy, scipy, pillow, pyyaml, pytest and matplotlib), built for Python PYVER (e.g. 3.12) on x86-64 Linux;
# on the GPU host: pip install --no-index --no-deps --target /tmp/site DIR/*.whl, then PYTHONPATH=/tmp/site.
set -uo pipefail

if [[ "${1:-}" == wheels ]]; then
    dir=${2:?wheels DIR PYVER}; pyver=${3:?wheels DIR PYVER}
    mkdir -p "$dir"
    for spec in grpcio grpcio-health-checking "protobuf>=7.35.1,<8" pydantic pydantic-core annotated-types \
        typing-inspection blake3 prometheus-client safetensors rich psutil; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$dir" "$spec" || { echo "no wheel for $spec (Python $pyver)" >&2; exit 2; }
    done
    ls "$dir"
    exit 0
fi

data=${1:?usage: bench/gpu_checks.sh DATA_ROOT STEP... (tests throughput ranks repro-a repro-b)}
shift
[[ -d "$data" ]] || { echo "DATA_ROOT $data: not a folder" >&2; exit 2; }
(($#)) || { echo "name at least one step: tests throughput ranks repro-a repro-b" >&2; exit 2; }
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py=${PYTHON:-python3}

protocol=${REPRO_PROTOCOL:-quick} device=${REPRO_DEVICE:-cuda}
runs=${REPRO_DIR:-runs/reproduce/$protocol}
repro=(-m feddiff reproduce --protocol "$protocol" --splits iid --device "$device" --data-root "$data" --out-dir "$runs" --no-docs)

run_step() {
    local step=$1 seconds limit_var="STEP_SECONDS_${1//-/_}"
    seconds=${!limit_var:-540}
    echo "== $step (at most ${seconds} s) $(date -u +%FT%TZ)"
    case $step in
        tests) timeout "$seconds" "$py" -m pytest -q -p no:cacheprovider -m gpu tests ;;
        throughput) timeout "$seconds" "$py" -m bench.train_throughput --data-root "$data" ;;
        ranks) timeout "$seconds" "$py" -m bench.train_throughput --data-root "$data" --nproc-per-node 1 --bf16 off ;;
        repro-a) timeout "$seconds" "$py" "${repro[@]}" --only centralised,full:iid,usplit:iid ;;
        repro-b) timeout "$seconds" "$py" "${repro[@]}" --only ulatdec:iid,udec:iid ;;
        *) echo "unknown step $step: expected tests, throughput, ranks, repro-a or repro-b" >&2; return 2 ;;
    esac
}

{
    nvidia-smi -L || echo "nvidia-smi: not found"
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
for step in "$@"; do
    run_step "$step" >"$out/$step.log" 2>&1
    rc=$?
    echo "$step: exit $rc ($(tail -n 1 "$out/$step.log"))"
    ((rc == 0)) || status=1
done
if [[ -d "$runs" ]]; then
    cp "$runs"/results.jsonl "$out"/ 2>/dev/null
    (cd "$runs" && tar -cf - ./*/samples.png 2>/dev/null) >"$out/grids.tar"  # one file: few come back
fi
exit $status
