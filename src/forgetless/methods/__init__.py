"""Fine-tuning methods: which parameters train, with which optimizer, under which penalty.

    prepared = prepare_model(model, "attn+mofo", MethodOptions(fraction=0.1))
    optimizer = prepared.make_optimizer(lr=2e-5)
    loss = lm_loss + (prepared.regularizer(model) if prepared.regularizer else 0)

Presets follow Zhu et al., arXiv 2510.08564: training only the self-attention projections
(``attn``) or only the MLP gate + up projections with ``down_proj`` frozen (``mlp-gate-up``)
learns a new skill with far less forgetting than tuning the whole LLM. On GPT-2, which has an
ungated MLP, ``mlp-gate-up`` trains ``mlp.c_fc`` (the up projection) with ``mlp.c_proj`` (down)
frozen, the faithful analogue. On Phi-3, ``attn-qkv`` trains the fused ``qkv_proj`` and
``mlp-gate-up`` the fused ``gate_up_proj``; a split a fused layout cannot honour is an error.
"""

from forgetless.methods.anchor import AnchorPenalty
from forgetless.methods.layout import find_projections, text_layout
from forgetless.methods.prepare import MethodOptions, PreparedModel, merge_lora, prepare_model
from forgetless.methods.registry import Method, list_methods, parse_method, register_method

METHOD_NAMES = list_methods()

__all__ = [
    "METHOD_NAMES",
    "AnchorPenalty",
    "Method",
    "MethodOptions",
    "PreparedModel",
    "find_projections",
    "list_methods",
    "merge_lora",
    "parse_method",
    "prepare_model",
    "register_method",
    "text_layout",
]
