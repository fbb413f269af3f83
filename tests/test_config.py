"""Config validation: unknown keys and bad values are one-line errors listing the choices."""

import pytest

from forgetless.config import TrainConfig, load_config, parse_overrides
from forgetless.errors import ForgetlessError


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["learning_rate=1e-4", "packing=true", "method=attn"]) == {
        "learning_rate": 1e-4, "packing": True, "method": "attn"}
    with pytest.raises(ForgetlessError, match="not key=value"):
        parse_overrides(["learning_rate"])


def test_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: attn\nmax_steps: 3\n")
    config = load_config(TrainConfig, path, ["max_steps=5"])
    assert (config.method, config.max_steps) == ("attn", 5)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ForgetlessError, match=r"unknown key 'lr' \(valid keys: .*learning_rate"):
        load_config(TrainConfig, None, ["lr=1e-4"])


def test_bad_values():
    with pytest.raises(ForgetlessError, match="bad value for 'fraction'"):
        load_config(TrainConfig, None, ["fraction=1.5"])
    with pytest.raises(ForgetlessError, match="bad value for 'mofo_filter'.*momentum"):
        load_config(TrainConfig, None, ["mofo_filter=magnitude"])


def test_unknown_method_lists_methods():
    with pytest.raises(ForgetlessError, match="unknown method 'sgd'.*mlp-gate-up"):
        load_config(TrainConfig, None, ["method=sgd"])


def test_bad_files(tmp_path):
    with pytest.raises(ForgetlessError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ForgetlessError, match="invalid YAML"):
        load_config(TrainConfig, bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ForgetlessError, match="must be a mapping"):
        load_config(TrainConfig, bad)
