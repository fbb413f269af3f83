"""Make helper modules in tests/ (e.g. ``tiny_models``) importable from every test file; the
tiny-Llama folder fixture several job tests share, the in-process CLI runner, and the guard
that no model loads."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with ``tiny_models.tiny_llama()`` and the embedded tokenizer (once per module)."""
    from transformers import AutoTokenizer

    from forgetless.models import resolve_model
    from tiny_models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(folder)
    return folder


@pytest.fixture
def cli(monkeypatch, capsys):
    """``forgetless *argv`` run in this process: ``cli(*argv) -> (exit code, stdout, stderr)``
    (0 when ``main`` returns, the code of its ``SystemExit`` otherwise)."""
    from forgetless.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["forgetless", *argv])
        code = 0
        try:
            main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: refusals of bad input must come before any load."""
    import forgetless.models
    import forgetless.train

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the input was refused")

    monkeypatch.setattr(forgetless.models, "load_model", refuse)
    monkeypatch.setattr(forgetless.train, "load_model", refuse)
