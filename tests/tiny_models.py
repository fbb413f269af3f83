"""Tiny randomly initialised models, one per supported architecture, for fast unit tests.

Every model has 2 decoder layers, hidden size 32-64 and a 128-token vocabulary, so building one
takes milliseconds and a training step well under a second on CPU. Weights are seeded, so two
calls with the same ``arch`` give identical models.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

TINY_ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "llava", "qwen2_5_vl"]
VOCAB = 128

# Special token ids inside the tiny vocabulary (the config defaults point far outside it).
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Shared decoder sizes for the Llama-like families.
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **_TOKENS,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER, tie_word_embeddings=True))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_DECODER))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_DECODER, head_dim=8))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **_TOKENS
    )
    return GPT2LMHeadModel(config)


def _llava():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(**_DECODER)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=VOCAB - 1, vision_feature_layer=-1
    )
    return LlavaForConditionalGeneration(config)


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        _DECODER,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=32,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


_BUILDERS = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma": _gemma,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "llava": _llava,
    "qwen2_5_vl": _qwen2_5_vl,
}


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A seeded, randomly initialised 2-layer model of ``arch`` (one of ``TINY_ARCHS``), fp32."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    torch.manual_seed(seed)
    model = _BUILDERS[arch]()
    return model.float().eval()


def tiny_llama(seed: int = 0):
    """A tiny Llama that speaks the embedded tokenizer's vocabulary (SmolLM2's 49,152 tokens),
    for jobs that tokenize real text; weights seeded by ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True, pad_token_id=2, eos_token_id=2)
    return LlamaForCausalLM(config)
