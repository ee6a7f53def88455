"""Model families and their Hugging Face I/O.

`FAMILIES` maps config.json's `model_type` to the module implementing that family.
"""

from jaxsftdpo.models import gpt2

FAMILIES = {gpt2.MODEL_TYPE: gpt2}

# After FAMILIES: hf reads the registry when it is imported.
from jaxsftdpo.models.hf import (checkpoint_dir, family_for, from_pretrained,  # noqa: E402
                                 load_config, read_checkpoint, save_pretrained)

__all__ = ["FAMILIES", "checkpoint_dir", "family_for", "from_pretrained", "load_config",
           "read_checkpoint", "save_pretrained"]
