"""The README's first command: no network, a few minutes on two CPU cores.

A tiny GPT-2 built from its config, the byte-level tokenizer and the package's own yes/no task
(jaxsftdpo.data.synthetic): SFT, then DPO with the SFT policy as reference.
"""

from jaxsftdpo.config import base_config, finalize, stage


def get_config():
    c = base_config()
    c.model.name_or_path = ""
    c.model.init.update(model_type="gpt2", vocab_size=257, n_positions=64, n_embd=64,
                        n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256)
    c.model.dropout = False
    c.model.tokenizer = "bytes"
    c.data.task = "yes_no"
    c.data.n_train = 2048
    c.data.n_dev = 256
    c.stages = [stage("sft", epochs=1, learning_rate=3e-3, schedule="cosine", warmup_steps=10,
                      batch_size=32),
                stage("dpo", epochs=1, learning_rate=2e-4, batch_size=32)]
    c.dpo.beta = 0.1
    c.log_every = 10
    c.checkpoint_every = 200
    return finalize(c)
