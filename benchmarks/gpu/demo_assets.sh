#!/usr/bin/env bash
# Make the tiny demo's assets on a CUDA machine (the codec's steps and the teacher stage on the GPU):
#
#   bash benchmarks/gpu/demo_assets.sh OUT_DIR WORK_DIR [make_demo_assets options...]
#
# The device machine of this project has torch but not diffsynth/mmengine/deepspeed: wheels for
# them, when present in .whl/, are installed into /tmp/site first. The command run is the same
# `python -m vdot_ext.tools.make_demo_assets` a CPU user runs, with --device cuda.
set -eo pipefail
out=$1; work=$2; shift 2
export PYTHONUNBUFFERED=1
if ! python3 -c 'import diffsynth, mmengine, deepspeed' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    rm -rf /tmp/site/vdot_ext*
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m vdot_ext.tools.make_demo_assets --out "$out" --work-dir "$work" --device cuda "$@"
