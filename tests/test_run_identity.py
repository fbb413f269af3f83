"""Golden run identities: the hashes that name and key today's run folders.

A compare method's ``compare.json``, a continual stage's ``stage.json`` and a tune trial's folder
name (``trials/<recipe hash>``) and ``tune.json`` hold these hashes; when one changes, every
existing run folder of that kind is retrained instead of reused. The literal values below were
computed by the code as it was before the job engine moved (commit 2b17c86), so a refactor that
changes any of them fails here. A deliberate change gets its own test and a note in the docs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from forgetless import compare, continual, tune
from forgetless.jobs.tune_space import TRIAL_TRAIN, train_config

SHARED = {"model": "smollm2-135m", "data": "gsm8k", "max_steps": 5, "device": "cpu"}

# config -> {method label: compare train hash}
COMPARE_TRAIN = [
    ({"train": SHARED},
     {"full": "a7a9cf60c1544c1d", "lora": "a03daae3f89e17fb", "attn": "f55582903b7c20d6",
      "mlp-gate-up": "aae62fedc20776c3", "mofo": "0fc67f6a2263d6b8",
      "attn+mofo": "440e2626b2706495"}),
    ({"train": SHARED, "seeds": [0, 1],
      "methods": ["full", {"name": "lora4", "method": "lora", "lora_r": 4, "lora_alpha": 8}]},
     {"full seed 0": "a7a9cf60c1544c1d", "full seed 1": "551d404405c35b6a",
      "lora4 seed 0": "63b8ba9b0dcfeb2f", "lora4 seed 1": "3279f1554632737b"}),
    ({"train": SHARED, "seeds": [3], "methods": ["full"]}, {"full": "a3d3b4ff0124c095"}),
    ({"train": {**SHARED, "dtype": "bfloat16", "attn_implementation": "eager",
                "learning_rate": 1e-4},
      "methods": ["full", {"name": "mofo-exact", "method": "attn+mofo", "fraction": 0.2,
                           "mofo_exact": True, "fp32_master_weights": False}]},
     {"full": "d12a630c56505b22", "mofo-exact": "018dadd08520764f"}),
    ({"train": {**SHARED, "model": "llava-smollm2", "data": "shapes",
                "freeze_vision_tower": False},
      "methods": ["lora", {"name": "proj", "method": "full",
                           "freeze_multi_modal_projector": False,
                           "freeze_language_model": True}]},
     {"lora": "1b7de69fc6ba9a83", "proj": "ce87a2e2bfa9596d"}),
]


@pytest.mark.parametrize(("config", "expected"), COMPARE_TRAIN)
def test_compare_train_hashes_unchanged(config, expected):
    planned = compare.plan_methods(compare.load_compare_config(config))
    assert {p.label: compare.train_hash(p) for p in planned} == expected


def test_compare_eval_hashes_unchanged():
    config = compare.load_compare_config({"train": SHARED})
    assert compare.eval_hash(config, "gsm8k", "smollm2-135m") == "b2d46e1c9dd0048f"
    assert compare.eval_hash(config, None, "smollm2-135m", "bfloat16") == "1b86594cc533bd6d"
    config = compare.load_compare_config({
        "train": SHARED, "interpolate": [0.5],
        "eval": {"limit": {"piqa": 20}, "drift_prompts": 8, "suite": ["piqa"]}})
    assert compare.eval_hash(config, "count_letters", "llava-smollm2") == "b1d5692d6ad455e4"


CONTINUAL = {"train": {"max_steps": 3, "device": "cpu"},
             "methods": ["full", "lora", {"name": "m2", "method": "mofo", "fraction": 0.05}]}
TARGETS = ["count_letters", "gsm8k", "arc_easy_letter"]
DATA = ["count_letters", "gsm8k", "runs/c/data/arc_easy_letter.train.jsonl"]
STAGE_KEYS = {"full": ["5f532c5ad3370a12", "85e9d77e36624c65", "8de0a8a485d27d42"],
              "lora": ["26e30ac1ea749ecf", "78a6a1b9dec5f491", "7259bba03c74569a"],
              "m2": ["5bfcd6c7a2108580", "b7fed10b72e14678", "c7fad398cd711b37"]}


def test_continual_keys_unchanged():
    config = continual.load_continual_config(CONTINUAL)
    root = continual.eval_key(config, TARGETS)
    assert root == "7b15b42721596e16"
    assert continual.eval_key(config, TARGETS, "bfloat16") == "ac63f9882a3ad40b"
    stages = [continual.Stage(t, d, t, {"learning_rate": 1e-4} if i == 2 else {})
              for i, (t, d) in enumerate(zip(TARGETS, DATA), start=1)]
    found = {}
    for name, keys in continual.plan_methods(config):
        key, found[name] = root, []
        for index, stage in enumerate(stages, start=1):
            settings = {**continual._stage_keys(keys, stage),
                        "output_dir": f"runs/c/{name}/stage{index}-{stage.name}"}
            key = continual.stage_key(key, settings)
            found[name].append(key)
    assert found == STAGE_KEYS


# recipe -> (trial hash, test-run hash with seed 1)
TUNE_RECIPES = [
    ({"method": "mofo", "learning_rate": 1e-4, "fraction": 0.05},
     ("081106bbf72f8b87", "2e5f066dd9ae19e0")),
    ({"method": "lora", "learning_rate": 3e-4, "lora_r": 16},
     ("e0d29be4f084e281", "6299754d34d0bd99")),
    ({"method": "full", "learning_rate": 1e-5}, ("c2bf4a4cee158071", "6da8f4de14c3aed5")),
]


@pytest.mark.parametrize(("recipe", "expected"), TUNE_RECIPES)
def test_tune_recipe_hashes_unchanged(recipe, expected):
    config = tune.load_tune_config({"train": SHARED})
    trial = train_config(config, recipe, Path("."), **TRIAL_TRAIN)
    test = train_config(config, recipe, Path("runs/tune/test/x-seed1"), seed=1, **TRIAL_TRAIN)
    assert (tune.recipe_hash(trial), tune.recipe_hash(test)) == expected


def test_tune_eval_hashes_unchanged():
    config = tune.load_tune_config({"train": SHARED})
    assert tune.eval_hash(config, "validation", "gsm8k", "smollm2-135m") == "342696008853688a"
    assert tune.eval_hash(config, "test", "gsm8k", "smollm2-135m") == "c2cd65ba95383e58"


def test_tune_eval_hash_names_a_half_dtype():
    """Deliberate change (after the engine move): tune's eval hash named neither dtype nor
    device, so a float32 base evaluation was reused by a bfloat16 search. The dtype now joins
    it away from float32 (as in compare and continual): float32 caches keep their hash above."""
    config = tune.load_tune_config({"train": SHARED})
    val = tune.eval_hash(config, "validation", "gsm8k", "smollm2-135m", "bfloat16")
    assert val == "d88910cc47fe7b97"
    assert val != tune.eval_hash(config, "validation", "gsm8k", "smollm2-135m", "float16")
    assert tune.eval_hash(config, "validation", "gsm8k", "smollm2-135m",
                          "float32") == "342696008853688a"
