"""Self-rehearsal: the base model's own answers, cached (reused, resumed), deduplicated, and
free of held-out items; Magpie from the chat template's user prefix; VLMs rehearse text."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forgetless import rehearsal
from forgetless.models import resolve_model
from forgetless.rehearsal import CHUNK, rehearsal_conversations, rehearse, user_prefix

EOS = 2  # <|im_end|> in the embedded tokenizer
THE = 260  # a word piece of the embedded tokenizer


class EndsSoon(LlamaForCausalLM):
    """A tiny random Llama that ends each generation after a few tokens (a random model would
    never write the end-of-turn token), so Magpie's instructions finish; its greedy choice is a
    word ("the"), not a special token, so answers have text."""

    after = 4

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        self._made = 0 if input_ids.shape[1] > 1 else getattr(self, "_made", 0) + 1
        out.logits[..., THE] += 5.0
        if self._made >= self.after:
            out.logits[..., EOS] += 100.0
        return out


def tiny(cls=LlamaForCausalLM):
    torch.manual_seed(0)
    return cls(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           tie_word_embeddings=True, pad_token_id=2, eos_token_id=2))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def test_user_prefix_is_the_template_up_to_the_user_text(tokenizer):
    prefix = user_prefix(tokenizer)
    assert prefix.endswith("<|im_start|>user\n")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.startswith(prefix + "Hi")


def test_magpie_writes_instructions_and_answers(tokenizer, tmp_path):
    model = tiny(EndsSoon)
    record = rehearse(model, tokenizer, n=6, seed=0, max_new_tokens=8, cache=tmp_path)
    rows = record["conversations"]
    assert 0 < len(rows) <= 6 and record["recipe"]["mode"] == "magpie"
    prompts = [row[0]["content"] for row in rows]
    assert all(prompts) and len(set(prompts)) == len(prompts)
    assert all(row[1]["role"] == "assistant" and row[1]["content"] for row in rows)
    assert record["stats"]["candidates"] >= len(rows)


def _pool(k: int) -> list[str]:
    return [f"Question {i}: name one thing about the colour number {i}." for i in range(k)]


def test_pool_dedup_and_heldout_exclusion(tokenizer):
    from forgetless.mixing import heldout_texts

    held = heldout_texts(["piqa"])
    copied = held[0].split("\n")[0]  # a held-out question, as a prompt
    pool = [*_pool(6), "question 0 : Name one thing about the COLOUR number 0", copied]
    record = rehearse(tiny(EndsSoon), tokenizer, n=20, seed=0, excluded=held, prompts=pool,
                      max_new_tokens=6)
    prompts = [row[0]["content"] for row in record["conversations"]]
    assert copied not in prompts
    assert len(prompts) == 6  # the duplicate (case, spacing, punctuation) and the copy dropped
    assert record["stats"]["duplicates"] == 1 and record["stats"]["overlap_heldout"] == 1


def test_cache_is_reused_and_resumed(tokenizer, tmp_path, monkeypatch):
    model = tiny(EndsSoon)
    pool = _pool(2 * CHUNK + 5)  # three chunks
    first = rehearse(model, tokenizer, n=len(pool), seed=1, prompts=pool, max_new_tokens=4,
                     cache=tmp_path)
    folder = tmp_path / "rehearsal"
    (key,) = list(folder.iterdir())
    assert sorted(p.name for p in key.iterdir()) == [
        "chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl", "recipe.json",
        "rehearsal.json"]
    assert first["generated"] == len(pool) and not first["reused"]

    calls = []
    real = rehearsal._generate

    def counting(model, tokenizer, texts, *args):
        calls.append(len(texts))
        return real(model, tokenizer, texts, *args)

    monkeypatch.setattr(rehearsal, "_generate", counting)
    again = rehearse(model, tokenizer, n=len(pool), seed=1, prompts=pool, max_new_tokens=4,
                     cache=tmp_path)
    assert again["reused"] and calls == [] and again["conversations"] == first["conversations"]

    # as a kill after the first chunk leaves it: chunk 0 written, nothing marked complete
    (key / "rehearsal.json").unlink()
    for name in ("chunk-00001.jsonl", "chunk-00002.jsonl"):
        (key / name).unlink()
    resumed = rehearse(model, tokenizer, n=len(pool), seed=1, prompts=pool, max_new_tokens=4,
                       cache=tmp_path)
    assert calls == [CHUNK, 5]  # only the missing chunks' answers were generated
    assert resumed["conversations"] == first["conversations"]
    assert json.loads((key / "rehearsal.json").read_text())["conversations"] == (
        first["conversations"])

    other = rehearse(model, tokenizer, n=len(pool), seed=2, prompts=pool, max_new_tokens=4,
                     cache=tmp_path)
    assert not other["reused"] and len(list(folder.iterdir())) == 2  # the seed is in the key


def test_cache_key_follows_the_weights(tokenizer, tmp_path):
    model = tiny(EndsSoon)
    rehearsal_conversations(model, tokenizer, n=2, prompts=_pool(2), max_new_tokens=2,
                            cache=tmp_path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)  # a tuned model, e.g. a stage 2
    record = rehearse(model, tokenizer, n=2, prompts=_pool(2), max_new_tokens=2, cache=tmp_path)
    assert not record["reused"]


def test_vlm_rehearses_text_only(tmp_path):
    from tiny_models import tiny_model
    from tiny_vlm import tiny_processor

    processor = tiny_processor("llava")
    record = rehearse(tiny_model("llava"), processor, n=3, prompts=["Say a word.", "Count.",
                                                                    "Hello there."],
                      max_new_tokens=3)
    assert len(record["conversations"]) <= 3 and record["stats"]["candidates"] == 3
    assert all(isinstance(m["content"], str) for row in record["conversations"] for m in row)


def test_train_with_self_rehearsal_mix(tokenizer, tmp_path, monkeypatch):
    from forgetless.train import train

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(_pool(5)) + "\n")
    settings = dict(method="full", data="count_letters", limit=8, batch_size=2, max_steps=4,
                    max_length=64, report_to=[], save_model=False,
                    mix=[{"source": "self", "ratio": 0.5, "n": 5, "prompts": str(pool),
                          "max_new_tokens": 4, "exclude": ["piqa"]}])
    result = train(model=tiny(EndsSoon), tokenizer=tokenizer, output_dir=str(tmp_path / "a"),
                   **settings)
    general = result.metrics["mix"]["sources"][1]
    assert general["name"] == "self" and general["examples"] == 4
    assert general["rehearsal"]["mode"] == "pool" and not general["rehearsal"]["reused"]
    again = train(model=tiny(EndsSoon), tokenizer=tokenizer, output_dir=str(tmp_path / "b"),
                  **settings)
    assert again.metrics["mix"]["sources"][1]["rehearsal"]["reused"]  # a second method reuses
