#!/usr/bin/env bash
# jaxsftdpo's speed on an accelerator, jaxsftdpo alone (no PyTorch reference), in bf16:
#   1. one attention layer at SmolLM2's grouped-query shape, einsum vs fused path (cuDNN on an
#      NVIDIA GPU): their times, whether they agree, whether padding rows stay finite;
#   2. the train benchmark, SFT and DPO x full and LoRA, at GPT-2-small's shape (12 layers,
#      width 768, 12 heads) and at SmolLM2-135M's, 1024-token sequences;
#   3. greedy generation at both shapes.
# Each prints step times, tokens/s and MFU. Made to finish in under 5 minutes on one H100/H200,
# compiles included (2 timed repeats per case).
#
#   scripts/accelerator_check.sh                # from anywhere; the repo goes on PYTHONPATH
#   WHEELS=.whl scripts/accelerator_check.sh    # first pip install every wheel in .whl, offline
#   TINY=1 scripts/accelerator_check.sh         # the same steps at toy sizes (CPU, a minute or two)
#   ATTENTION=einsum scripts/accelerator_check.sh   # layers.attention's path (default auto)
#
# A failing step is reported and the others still run; the exit status is the failure count.
# If the fused attention check fails, the model runs fall back to ATTENTION=einsum.

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then  # exactly these wheels, for what the machine's Python lacks
    python -m pip install --no-index --no-deps "$WHEELS"/*.whl || exit 1
fi
python -c 'import jaxsftdpo.models, jaxsftdpo.generate, jaxsftdpo.lora, jaxsftdpo.steps' || {
    echo "jaxsftdpo does not import here; give WHEELS= a folder with the missing packages' wheels"
    exit 1
}

if [[ "${TINY:-0}" == 1 ]]; then
    seq=64 batch=2 repeats=1 prompt=16 new_tokens=8
    gpt2="--layers 2 --width 64 --heads 4" smollm2="--layers 2"
else
    seq=1024 batch=8 repeats=2 prompt=128 new_tokens=128
    gpt2="--layers 12 --width 768 --heads 12" smollm2=""
fi
attention="${ATTENTION:-auto}"
failures=0

step() {
    echo
    echo "+ $*"
    "$@" || { echo "FAILED (exit $?): $*"; failures=$((failures + 1)); return 1; }
}

python -c 'import jax; print("jax", jax.__version__, jax.devices())'
bench=(python scripts/benchmark.py)
if ! step "${bench[@]}" attention --batch "$batch" --seq "$seq" --heads 9 --kv-heads 3 \
        --head-dim 64 --dtype bfloat16 && [[ "$attention" != einsum ]]; then
    attention=einsum
    echo "the fused attention failed: the model runs below use --attention einsum"
fi
for shape in gpt2 smollm2; do
    [[ $shape == gpt2 ]] && sizes=$gpt2 || sizes=$smollm2
    # shellcheck disable=SC2086  # $sizes is a list of options
    step "${bench[@]}" train --shape $shape $sizes --seq "$seq" --batch "$batch" \
        --repeats "$repeats" --dtype bfloat16 --attention "$attention" --no-reference \
        --no-precomputed-ref
    # shellcheck disable=SC2086
    step "${bench[@]}" generate --shape $shape $sizes --batch "$batch" --prompt-len "$prompt" \
        --new-tokens "$new_tokens" --repeats "$repeats" --dtype bfloat16 \
        --attention "$attention" --no-reference
done
echo
echo "failed steps: $failures"
exit "$failures"
