"""Tiny GGUF files for the tests, written as llama.cpp's convert_hf_to_gguf.py would write them
(from random transformers models), with a tiny byte-level BPE tokenizer in their metadata."""

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


# ---- a tiny byte-level BPE tokenizer, as llama.cpp stores GPT-2-style vocabularies ----------

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "o n", "Ġ on"]
END_OF_TEXT = "<|endoftext|>"


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """`(tokens, token types)`: the 256 byte symbols, every merge's result, one control token."""
    tokens = [bytes_to_unicode()[byte] for byte in range(256)]
    tokens += ["".join(merge.split(" ")) for merge in MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL]
    return tokens + [END_OF_TEXT], types


TOKENS, TOKEN_TYPES = tiny_vocabulary()
EOS_ID = TOKENS.index(END_OF_TEXT)


# ---- writing GGUF files the way llama.cpp's converter does ----------------------------------

def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotary halves -> interleaved pairs)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_freqs(config) -> np.ndarray:
    """What llama.cpp writes as `rope_freqs.weight` for a llama3 rope scaling."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    context = rope["original_max_position_embeddings"]
    low_wavelength = context / rope["low_freq_factor"]
    high_wavelength = context / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < high_wavelength:
            factors.append(1)
        elif wavelength > low_wavelength:
            factors.append(rope["factor"])
        else:
            smooth = ((context / wavelength - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, np.float32)


def write_gguf(path: Path, model, arch: str, qtype=QType.F32, *, name="tiny",
               explicit_head_dim=False, raw_types=None) -> Path:
    """`raw_types`: GGUF tensor name -> a type to store that tensor as, with zero bytes."""
    config = model.config
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    rope = config.rope_parameters
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == QType.F32
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
    if explicit_head_dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(EOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)

    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied checkpoint's safetensors has no lm_head
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = permute(data, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = permute(data, config.num_key_value_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name in (raw_types or {}):
            raw_type = raw_types[gguf_name]
            blocks = np.zeros(gguf.quant_shape_to_byte_shape(data.shape, raw_type), np.uint8)
            writer.add_tensor(gguf_name, blocks, raw_dtype=raw_type)
        elif data.ndim == 2 and qtype != QType.F32:  # llama.cpp keeps 1-D tensors in F32
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_model(model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # move norms off 1 and biases off 0, so a mixed-up mapping shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def llama_config(**changes):
    return LlamaConfig(vocab_size=len(TOKENS), **SIZES, rope_theta=10000.0,
                       bos_token_id=EOS_ID, eos_token_id=EOS_ID, **changes)


def transformers_gguf_model(path: Path):
    """transformers' own loading of the GGUF file at `path` (dequantised), the reference."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
