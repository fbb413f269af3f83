"""Property-based fuzzing (hypothesis): every data file, config, override and task file either
works or raises ForgetlessError (one line at the CLI, exit 2), never another exception.

The number of generated cases per target is printed (``-s``) and, with
``FORGETLESS_FUZZ_REPORT=<file>``, saved as JSON (docs/reliability.md quotes it).
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetless.compare import CompareConfig
from forgetless.config import TrainConfig, load_config, load_sectioned_config, parse_overrides
from forgetless.continual import ContinualConfig
from forgetless.data import load_conversations, row_to_messages
from forgetless.errors import ForgetlessError
from forgetless.eval.tasks import load_task, spec_from_yaml

CASES: Counter = Counter()  # target -> generated cases
OUTCOMES: Counter = Counter()  # (target, "ok" | "error") -> count
FUZZ = settings(max_examples=int(os.environ.get("FORGETLESS_FUZZ_EXAMPLES", "50")),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def outcome(target: str, call, *args, **kwargs):
    """Run ``call``; anything but success or ForgetlessError fails the test (with its input)."""
    CASES[target] += 1
    try:
        result = call(*args, **kwargs)
    except ForgetlessError as err:
        OUTCOMES[target, "error"] += 1
        assert str(err).strip(), "an error must say something"
        return None
    OUTCOMES[target, "ok"] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    summary = {t: {"cases": n, "ok": OUTCOMES[t, "ok"], "error": OUTCOMES[t, "error"]}
               for t, n in sorted(CASES.items())}
    print(f"\n[fuzz] {json.dumps(summary)}")
    report = os.environ.get("FORGETLESS_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(summary, indent=1))


# --- strategies -------------------------------------------------------------------------------

odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "\x00", "\ufeff", "\u202e", "é", "🙂", "\r\n", "null", "{{",
                     "}}", "a,b", '"', "'", "\\", "0", "-1", "1e400", "NaN", "[", "{", "x=y"]),
    st.text(min_size=1, max_size=20).map(lambda t: t * 300),  # huge fields
)
words = st.text(string.ascii_letters + string.digits + " ?.,'\"é🙂", min_size=1, max_size=30)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
role = st.sampled_from(["system", "user", "assistant", "tool", "", None, 3, ["user"]])
message = st.fixed_dictionaries({"role": role}, optional={"content": st.one_of(odd_text,
                                                                              json_value)})
good_row = st.one_of(
    st.fixed_dictionaries({"prompt": words, "response": words.filter(str.strip)}),
    st.fixed_dictionaries({"messages": st.tuples(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                        "content": words}), max_size=2),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": words}),
    ).map(lambda t: [*t[0], t[1]])}),
)
row = st.one_of(
    good_row, good_row, good_row,
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(odd_text, json_value),
                                        "response": st.one_of(odd_text, json_value)}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), json_value)}),
    st.dictionaries(odd_text, json_value, max_size=4),
    json_value,
)
encoding = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"])


def _encode(text: str, codec: str) -> bytes:
    return text.encode(codec, errors="replace")


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a JSONL, JSON or CSV file, sometimes damaged or binary."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"] * 3 + [".txt", ""]))
    rows = draw(st.lists(good_row, min_size=1, max_size=5) | st.lists(row, max_size=5))
    kind = draw(st.sampled_from(["clean"] * 6 + ["truncated", "binary", "junk"]))
    if kind == "binary":
        return suffix, draw(st.binary(max_size=300))
    if suffix == ".csv":
        columns = draw(st.sampled_from([["prompt", "response"], ["prompt"], ["messages"],
                                        ["a", "prompt", "response"]]))
        lines = [",".join(columns)]
        for r in rows:
            values = r if isinstance(r, dict) else {}
            lines.append(",".join(json.dumps(values.get(c, ""), default=str)
                                  if not isinstance(values.get(c), str)
                                  else '"' + values[c].replace('"', '""') + '"'
                                  for c in columns))
        text = "\n".join(lines)
    elif suffix == ".json":
        text = json.dumps(rows)
    else:
        text = "\n".join(json.dumps(r) for r in rows)
    if kind == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "junk":
        text += draw(odd_text)
    codec = draw(st.sampled_from(["utf-8"] * 4 + ["utf-8-sig"] * 2 + ["utf-16", "latin-1"]))
    return suffix, _encode(text, codec)


# --- data -------------------------------------------------------------------------------------


@FUZZ
@given(data_file())
def test_data_files_work_or_fail_cleanly(tmp_path_factory, case):
    suffix, raw = case
    path = tmp_path_factory.mktemp("data") / f"rows{suffix}"
    path.write_bytes(raw)
    conversations = outcome("data files", load_conversations, str(path))
    for messages in conversations or []:
        assert messages and messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in messages)


@FUZZ
@given(row)
def test_rows_to_messages(value):
    if isinstance(value, dict):
        outcome("data rows", row_to_messages, value, "rows.jsonl:1")


def test_good_files_in_every_format_read_the_same(tmp_path):
    rows = [{"prompt": "Héllo, \"you\"", "response": "4\n2"}, {"prompt": "🙂", "response": "x"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_bytes(json.dumps(rows).encode("utf-8-sig"))
    (tmp_path / "a.csv").write_text('prompt,response\n"Héllo, ""you""","4\n2"\n🙂,x\n')
    found = [load_conversations(str(tmp_path / f"a.{s}")) for s in ("jsonl", "json", "csv")]
    assert found[0] == found[1] == found[2] and found[0][0][0]["content"] == 'Héllo, "you"'


# --- configs and overrides --------------------------------------------------------------------

keys = st.sampled_from([*TrainConfig.model_fields, "lr", "", "train", "eval", "methods",
                        "tasks", "output_dir", "a.b", "train.max_steps", "eval.limit"])
override = st.one_of(
    st.tuples(keys, odd_text).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(keys, st.sampled_from(["[", "[a, b", "{x: 1}", "*a", "&a b", "!!python/none",
                                     "- x", "1e-4", "true", "~", ": :", "'", "[1, [2]]"]))
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    odd_text,
)


@st.composite
def config_file(draw) -> bytes:
    kind = draw(st.sampled_from(["mapping", "mapping", "any", "text", "binary"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return _encode(draw(odd_text), draw(encoding))
    if kind == "any":
        return yaml.safe_dump(draw(json_value)).encode()
    data = draw(st.dictionaries(st.one_of(keys, st.integers(), odd_text), json_value,
                                max_size=6))
    return _encode(yaml.safe_dump(data, allow_unicode=True), draw(encoding))


@FUZZ
@given(config_file(), st.lists(override, max_size=4),
       st.sampled_from([TrainConfig, CompareConfig, ContinualConfig]))
def test_config_files_and_overrides(tmp_path_factory, raw, pairs, cls):
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_bytes(raw)
    if cls is TrainConfig:
        outcome("config files + overrides", load_config, cls, path, pairs)
    else:
        outcome("sectioned configs + overrides", load_sectioned_config, cls, path, pairs)


@FUZZ
@given(st.lists(override, max_size=6))
def test_overrides_alone(pairs):
    outcome("key=value overrides", parse_overrides, pairs)


def test_a_binary_config_is_one_clean_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(ForgetlessError, match="not a UTF-8 text file"):
        load_sectioned_config(CompareConfig, tmp_path / "c.yaml")


# --- task files and their Jinja ---------------------------------------------------------------

fields = ["q", "options", "answer", "label", "n", "text"]
atom = st.one_of(st.sampled_from(fields), st.integers(-3, 5).map(str),
                 st.sampled_from(["'a'", "[1, 2]", "['x', 'y', 'z']", "none", "true", "range(3)",
                                  "loop", "self", "cycler", "{'k': 1}", "lipsum"]))


@st.composite
def expression(draw, depth: int = 0):
    if depth > 2 or draw(st.booleans()):
        return draw(atom)
    left, right = draw(expression(depth + 1)), draw(expression(depth + 1))
    return draw(st.sampled_from([
        f"{left} + {right}", f"{left}[{right}]", f"{left}|length", f"{left}|int",
        f"{left}|join(',')", f"{left}|upper", f"({left}, {right})", f"[{left}, {right}]",
        f"{left} if {right} else {left}", f"{left}.{draw(st.sampled_from(fields))}",
        f"{left}|map('int')|list", f"{left} ~ {right}", f"{left}.__class__",
        f"{left}[:{right}]", f"{left} // {right}",
    ]))


template = st.one_of(expression().map(lambda e: "{{ " + e + " }}"),
                     st.tuples(odd_text, expression()).map(lambda t: f"{t[0]}{{{{ {t[1]} }}}}"),
                     odd_text, st.sampled_from(["{% for x in options %}{{x}}{% endfor %}",
                                                "{{", "{% if %}", "{{ q }"]))
good_task_row = st.integers(1, 4).flatmap(lambda n: st.fixed_dictionaries({
    "q": words, "options": st.lists(words, min_size=n, max_size=n),
    "answer": st.integers(0, n - 1), "label": st.integers(0, n - 1).map(str), "n": st.just(n),
    "text": words}))
task_rows = st.one_of(
    st.lists(good_task_row, min_size=1, max_size=4),
    st.lists(good_task_row, min_size=1, max_size=4),
    st.lists(st.fixed_dictionaries({}, optional={f: json_value for f in fields}), max_size=4),
)
task_field = {
    "name": st.one_of(st.just("fuzz"), odd_text, json_value),
    "text": st.one_of(template, json_value), "choices": st.one_of(expression(), json_value),
    "gold": st.one_of(expression(), json_value), "contexts": expression(),
    "continuation": template, "id": expression(), "description": template,
    "fields": st.dictionaries(st.sampled_from(["extra", "q"]), expression(), max_size=2),
    "columns": st.one_of(st.just(fields[:3]), json_value), "split": st.sampled_from(["test",
                                                                                     "dev"]),
    "fewshot_split": st.just("test"), "fewshot_sampler": st.sampled_from(["first_n", "random",
                                                                          "x"]),
    "metrics": st.one_of(st.just(["acc"]), json_value), "target_delimiter": odd_text,
    "unknown_field": json_value,
}


@st.composite
def task_case(draw):
    chosen = draw(st.lists(st.sampled_from(sorted(task_field)), unique=True, max_size=3))
    spec = draw(st.sampled_from([
        {"name": "fuzz", "text": "Q: {{ q }}\nA:", "choices": "options", "gold": "answer",
         "fewshot_split": "test"},
        {"name": "fuzz", "text": "{{ q|upper }}", "choices": "options", "gold": "label|int",
         "id": "q ~ '-' ~ n", "fewshot_split": "test", "fields": {"m": "n * 2"}},
        {"name": "fuzz", "contexts": "options", "continuation": " {{ text }}", "gold": "answer"},
        {},
    ]) | st.just({"name": "fuzz", "text": "Q: {{ q }}\nA:", "choices": "options",
                  "gold": "answer", "fewshot_split": "test"}))
    spec.update({k: draw(task_field[k]) for k in chosen})
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    spec.setdefault("data_files", {"test": f"rows{suffix}"})
    rows = draw(task_rows)
    if suffix == ".csv":
        body = "\n".join([",".join(fields)] + [",".join(str(r.get(f, "")).replace(",", " ")
                                                        .replace("\n", " ") for f in fields)
                                               for r in rows])
    elif suffix == ".json":
        body = json.dumps(rows if draw(st.booleans()) else {"data": rows})
    else:
        body = "\n".join(json.dumps(r) for r in rows)
    # hypothesis favours small draws (0): make 0 the common, well-formed case
    raw = draw(st.binary(max_size=100)) if draw(st.integers(0, 5)) == 5 else body.encode()
    text = draw(odd_text) if draw(st.integers(0, 9)) == 9 else yaml.safe_dump(spec,
                                                                          allow_unicode=True)
    return text, suffix, raw, draw(st.integers(0, 2)), draw(st.one_of(st.none(),
                                                                       st.integers(1, 3)))


@FUZZ
@given(task_case())
def test_task_files_and_jinja(tmp_path_factory, case):
    text, suffix, raw, shots, limit = case
    folder = tmp_path_factory.mktemp("task")
    (folder / f"rows{suffix}").write_bytes(raw)
    spec = outcome("task files (YAML)", spec_from_yaml, text, "fuzz.yaml", folder)
    if spec is not None:
        task = outcome("task rows + Jinja", load_task, spec, limit, 0, shots)
        for item in task.items if task else []:
            assert 0 <= item.gold < len(item.requests)
            assert all(isinstance(c, str) and isinstance(x, str) for c, x in item.requests)


def test_sandbox_refuses_python_internals(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"q": "x", "options": ["a"], "answer": 0}))
    text = yaml.safe_dump({"name": "t", "data_files": {"test": "rows.jsonl"}, "gold": "answer",
                           "text": "{{ q.__class__.__mro__[1].__subclasses__() }}",
                           "choices": "options"})
    with pytest.raises(ForgetlessError, match="cannot evaluate text"):
        load_task(spec_from_yaml(text, "t.yaml", tmp_path))


# --- end to end through the CLI ---------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


@pytest.mark.parametrize("case", ["binary data", "binary compare config", "blocked output"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    """The three tracebacks of issue 16, now one line each, before any model is loaded."""
    (tmp_path / "blob.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "blob.yaml").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "file").write_text("a file, not a folder")
    args = {
        "binary data": ["train", f"data={tmp_path / 'blob.jsonl'}"],
        "binary compare config": ["compare", str(tmp_path / "blob.yaml")],
        "blocked output": ["train", "data=count_letters", f"output_dir={tmp_path}/file/run"],
    }[case]
    done = _cli(*args, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("forgetless: error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "loading" not in done.stdout  # failed before any model loaded
    CASES["CLI end to end"] += 1
    OUTCOMES["CLI end to end", "error"] += 1


# --- image rows (TRL-style images + messages with image parts, or image + prompt + response) --

IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
                 "TIFF": ".tif", "ICO": ".ico", "PPM": ".ppm"}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00",
         b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\x00\x00\x01\x00", b"P6\n", b"8BPS",
         b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data (a decompression bomb
    as Pillow sees it when the size is absurd)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (MAGIC[0] + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


@st.composite
def image_bytes(draw, clean: bool = False) -> tuple[str, bytes | None]:
    """(suffix, content) of an image file: valid in many formats, modes and shapes, or
    truncated, bit-flipped, a magic number with junk, empty, text, a bomb; None = no file,
    b"/" = a folder at that path."""
    import io

    from PIL import Image

    kind = "valid" if clean else draw(st.sampled_from(
        ["valid"] * 3 + ["truncated", "flipped", "magic", "empty", "text", "bomb", "missing",
                         "folder"]))
    if kind == "missing":
        return ".png", None
    if kind == "folder":
        return ".png", b"/"
    if kind == "empty":
        return draw(st.sampled_from([".png", ".jpg", ""])), b""
    if kind == "text":
        return ".png", _encode(draw(odd_text), "utf-8")
    if kind == "magic":
        return draw(st.sampled_from([".png", ".jpg", ".gif", ".img"])), (
            draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=200)))
    if kind == "bomb":
        side = draw(st.sampled_from([20_000, 70_000, 1 << 30]))
        return ".png", _png_header(side, draw(st.sampled_from([side, 1])))
    fmt = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "F", "I;16", "CMYK"]))
    size = draw(st.sampled_from([(1, 1), (2, 3), (16, 16), (1, 300), (300, 1), (40, 25)]))
    image = Image.new(mode, size, color=draw(st.integers(0, 255)) if mode != "F" else 0.5)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold it: an RGB PNG then
        fmt, buffer = "PNG", io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt)
    raw = buffer.getvalue()
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif kind == "flipped":
        flips = draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                              min_size=1, max_size=4))
        data = bytearray(raw)
        for at, xor in flips:
            data[at] ^= xor
        raw = bytes(data)
    return IMAGE_FORMATS[fmt], raw


image_name = st.one_of(
    st.sampled_from(["img", "sub/img", "ü ñ 🙂", "../outside", "a" * 300]),  # 300: too long
    st.text(string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=12),
)
odd_path = st.sampled_from(["", " ", ".", "..", "/", "nul\x00byte.png", "~no_such_user_x/a.png",
                            "https://example.com/a.png", "a.png\n"])


@st.composite
def image_case(draw):
    """A data file of image rows and the image files it names (relative to the file); about
    half the cases are well-formed throughout, so that accepted rows get checked too."""
    files: dict[str, tuple[str, bytes | None]] = {}
    rows = []
    clean = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        paths = []
        for _ in range(draw(st.integers(int(clean), 3))):
            if not clean and draw(st.integers(0, 9)) == 9:
                paths.append(draw(odd_path))
                continue
            name = draw(image_name)
            if name not in files:
                files[name] = draw(image_bytes(clean))
            paths.append(name + files[name][0])
        slots = len(paths) if clean else draw(st.sampled_from(
            [len(paths)] * 4 + [0, len(paths) + 1, max(0, len(paths) - 1)]))
        prompt, response = draw(words), draw(words.filter(str.strip))
        form = draw(st.sampled_from(["trl", "short"] if clean else
                                    ["trl"] * 3 + ["short"] * 3 + ["both", "odd"]))
        if form == "short":
            image: Any = paths[0] if len(paths) == 1 and draw(st.booleans()) else paths
            rows.append({"image": image, "prompt": prompt, "response": response})
        elif form == "trl":
            parts: list[Any] = [{"type": "image"}] * slots + [{"type": "text", "text": prompt}]
            if not clean and draw(st.integers(0, 5)) == 5:
                parts.insert(0, draw(json_value))
            user = {"role": "user", "content": draw(st.permutations(parts))}
            answer = {"role": "assistant", "content": draw(st.sampled_from(
                [response, [{"type": "text", "text": response}]] + ([] if clean else [[], None])))}
            messages = draw(st.sampled_from(
                [[user, answer], [{"role": "system", "content": prompt}, user, answer]]
                + ([] if clean else [[answer, user], [user]])))
            rows.append({"images": paths, "messages": messages})
        elif form == "both":
            rows.append({"images": paths, "image": paths[:1], "prompt": prompt,
                         "response": response})
        else:
            key = draw(st.sampled_from(["images", "image"]))
            rows.append({key: draw(json_value), **draw(st.sampled_from(
                [{"prompt": prompt, "response": response},
                 {"messages": draw(st.one_of(st.lists(message, max_size=3), json_value))}]))})
    suffix = draw(st.sampled_from([".jsonl"] * 4 + [".json", ".csv"]))
    if suffix == ".json":
        text = json.dumps(rows, ensure_ascii=draw(st.booleans()))
    elif suffix == ".csv":
        text = "image,prompt,response\n" + "\n".join(
            ",".join(json.dumps(str(r.get(k, ""))) for k in ("image", "prompt", "response"))
            for r in rows)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in rows)
    codec = draw(st.sampled_from(["utf-8", "utf-8-sig"] if clean else
                                 ["utf-8"] * 5 + ["utf-8-sig", "utf-16"]))
    return files, suffix, _encode(text, codec)


@FUZZ
@given(image_case())
def test_image_rows_work_or_fail_cleanly(tmp_path_factory, case):
    """Every image row is read, with every image checked, or is one ForgetlessError; what is
    accepted opens as RGB (what the collator feeds the processor) and fills its image parts."""
    from forgetless.data import load_examples
    from forgetless.vlm.examples import image_count
    from forgetless.vlm.images import open_image

    files, suffix, raw = case
    folder = tmp_path_factory.mktemp("images") / "data"  # "../x" stays inside this case
    (folder / "sub").mkdir(parents=True)
    for name, (ext, content) in files.items():
        path = folder / (name + ext)
        if content is None or len(path.name.encode()) > 255:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == b"/":
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(content)
    data = folder / f"rows{suffix}"
    data.write_bytes(raw)
    examples = outcome("image rows", load_examples, str(data))
    for example in examples or []:
        assert example.messages[-1]["role"] == "assistant"
        assert image_count(example.messages) == len(example.images)
        for image in example.images:
            assert open_image(image).mode == "RGB"


@pytest.mark.parametrize("name", ["a" * 300 + ".png", "~no_such_user_x/a.png", "big.png"])
def test_image_paths_the_fuzzer_broke_on_are_one_error(tmp_path, recwarn, name):
    """Found by the image fuzzer: a name too long for the file system (OSError from is_file)
    and "~user" of an unknown user (RuntimeError from expanduser) were tracebacks; an image
    above Pillow's pixel limit printed a DecompressionBombWarning line before the error."""
    from forgetless.data import load_examples

    (tmp_path / "big.png").write_bytes(_png_header(10_000, 10_000))  # 1e8 px: warns, < 2x limit
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": name, "prompt": "p",
                                                     "response": "r"}))
    with pytest.raises(ForgetlessError, match="rows.jsonl:1: .*(bad image path|Pillow's limit)"):
        load_examples(str(tmp_path / "rows.jsonl"))
    assert not recwarn.list
    if name != "big.png":  # the same names as the data file itself
        with pytest.raises(ForgetlessError, match="bad data path"):
            load_examples(name + ".jsonl" if "~" in name else str(tmp_path / name) + ".jsonl")
