"""Model families and their Hugging Face I/O.

`FAMILIES` maps config.json's `model_type` to the module implementing that family (one module
may serve several model types); `jaxsftdpo.models.family` writes down what such a module is.
"""

from jaxsftdpo.models import gpt2, llama
from jaxsftdpo.models.family import check_family

FAMILIES = {}
for _family in (gpt2, llama):
    check_family(_family)
    FAMILIES.update(dict.fromkeys(_family.MODEL_TYPES, _family))

# After FAMILIES: hf reads the registry when it is imported.
from jaxsftdpo.models.hf import (checkpoint_dir, family_for, from_pretrained,  # noqa: E402
                                 load_config, read_checkpoint, save_pretrained)

__all__ = ["FAMILIES", "checkpoint_dir", "family_for", "from_pretrained", "load_config",
           "read_checkpoint", "save_pretrained"]
