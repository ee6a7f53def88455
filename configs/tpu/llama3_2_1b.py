"""Llama-3.2-1B-Instruct, SFT then DPO at a global batch of 32 sequences of 1,024 tokens, for a
Cloud TPU v5e-8; the parameters sharded over every chip (FSDP, `mesh.fsdp = -1`), so the same
file plans and runs on any slice.

Before renting the slice, plan it here (no TPU, no weights, no data: the model's config.json
only; docs/results/tpu/ has the results and the commands):

    pip install -e ".[tpu]"
    TPU_SKIP_MDS_QUERY=1 python -m jaxsftdpo.plan --config configs/tpu/llama3_2_1b.py \
        --topology v5e:2x4

Then on every worker of the slice at once (README, "Several devices, hosts and TPU pods"),
with prompt/completion and preference files where every worker sees them:

    python -m jaxsftdpo.train --config configs/tpu/llama3_2_1b.py --workdir /mnt/shared/l1b \
        --config.data.train=/mnt/shared/train.jsonl --config.data.dev=/mnt/shared/dev.jsonl \
        --config.parallel.distributed=true

What makes every step fit in 14 GiB of a v5e chip's 16 (each measured with `plan`;
docs/results/tpu/ has the numbers): bfloat16 compute (parameters and Adam state stay float32,
sharded 8 ways), each block recomputed in the backward pass (`model.remat`), the loss's logits
256 positions at a time (`model.logits_chunk`) so the float32 `[4, 1024, 128256]` logits of a
chip's rows never exist whole, and DPO's 32 pairs in two micro-batches of 16 (its step is two
sequences per pair). DPO's reference log-probs are computed once at the hand-off (`dpo.reference
= "precomputed"`), so no second copy of the model is held.
"""

from jaxsftdpo.config import base_config, finalize, stage


def get_config():
    c = base_config()
    c.model.name_or_path = "meta-llama/Llama-3.2-1B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.dropout = False
    c.model.remat = True
    c.model.logits_chunk = 256
    c.data.task = "jsonl"
    c.data.max_length = 1024
    c.stages = [stage("sft", epochs=1, batch_size=32, learning_rate=2e-5),
                stage("dpo", epochs=1, batch_size=32, grad_accum=2, learning_rate=5e-7)]
    c.dpo.beta = 0.1
    c.dpo.reference = "precomputed"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return finalize(c)
