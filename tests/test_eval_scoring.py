"""The batched scorer against plain one-sequence forward passes on a tiny random model."""

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.eval.scoring import check_model_tokenizer, encode_pair, score_requests
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama"), char_tokenizer()


def reference_logprob(model, tokenizer, context, continuation):
    """log p(continuation | context) from one unbatched, unpadded forward pass."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


REQUESTS = [
    ("Question: why?\nAnswer:", " because"),
    ("Question: why?\nAnswer:", " because of it"),  # shares an opening with the one above
    ("Question: why?\nAnswer:", " no"),
    ("Q: a much longer context than the others, to force padding\nA:", " yes"),
    ("Q: a much longer context than the others, to force padding\nA:", " maybe so"),
    ("x", " one-token context"),
    ("Trailing space ", "moves"),
]


@pytest.mark.filterwarnings("error::FutureWarning")  # the KV cache under its current name
@pytest.mark.parametrize("share_context", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_equal_unbatched_reference(lm, share_context, batch_size):
    model, tokenizer = lm
    got = score_requests(
        model, tokenizer, REQUESTS, batch_size=batch_size, share_context=share_context
    )
    want = [reference_logprob(model, tokenizer, c, x) for c, x in REQUESTS]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma", "phi3", "gpt2"])
def test_shared_context_path_on_other_architectures(arch):
    model, tokenizer = tiny_model(arch), char_tokenizer()
    requests = [r for r in REQUESTS if len(r[0]) > 1]  # every context leaves a cache
    got = score_requests(model, tokenizer, requests, batch_size=2)
    want = [reference_logprob(model, tokenizer, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=1e-4)


def test_small_token_budget_splits_batches_without_changing_scores(lm):
    model, tokenizer = lm
    small = score_requests(model, tokenizer, REQUESTS, batch_size=16, max_tokens=8)
    large = score_requests(model, tokenizer, REQUESTS, batch_size=16)
    assert small == pytest.approx(large, abs=1e-4)


def test_encode_pair_moves_trailing_space_like_lm_eval():
    tokenizer = char_tokenizer()
    ctx, cont = encode_pair(tokenizer, "Answer: ", "yes")
    assert tokenizer.decode(ctx) == "Answer:"
    assert tokenizer.decode(cont) == " yes"


def test_model_tokenizer_mismatch_is_one_line_error():
    model = tiny_model("llama")
    model.resize_token_embeddings(50)
    with pytest.raises(ForgetlessError, match="do not match") as err:
        check_model_tokenizer(model, char_tokenizer())
    assert "\n" not in str(err.value)
