"""Llama-3.2-1B's shape for `python -m jaxsftdpo.plan` (docs/results/tpu_plan/): SFT at a global
batch of 32 sequences of 1,024 tokens, bfloat16 compute, the parameters sharded over every chip
(FSDP: `mesh.fsdp = -1`, so the same file plans on any slice).

    python -m jaxsftdpo.plan --config configs/plan_llama1b.py --topology v5e:2x4

The model is built from its config (`model.init`: Llama-3.2-1B's config.json values that set a
shape), so planning needs no download; its weights, tokenizer and data are never needed. To
train, give `--config.model.name_or_path=meta-llama/Llama-3.2-1B-Instruct` and a task.
"""

from jaxsftdpo.config import base_config, finalize, stage


def get_config():
    c = base_config()
    c.model.init = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072, rms_norm_eps=1e-5)
    c.model.dtype = "bfloat16"
    c.model.dropout = False
    c.data.max_length = 1024
    c.stages = [stage("sft", steps=1, batch_size=32)]
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return finalize(c)
