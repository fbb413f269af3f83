"""Held-out tasks as data: a ``TaskSpec`` (usually a YAML file) says where the rows live and how
one row becomes a context and its answer choices; one scorer serves every task.

This is the lm-evaluation-harness model: ``text`` is a Jinja template (their ``doc_to_text``),
``choices`` and ``gold`` are Jinja *expressions* evaluated on the row (``doc_to_choice`` /
``doc_to_target``). Built-in tasks live in ``forgetless/tasks/*.yaml``; a user task is the same
schema in their own YAML file, pointing at their own files (relative paths resolve against the
YAML's folder) or at a Hub dataset id (``dataset:``, loaded with ``datasets.load_dataset``).

Minimal user task::

    name: my_quiz
    data_files: {test: quiz.jsonl}          # rows: {"q": ..., "options": [...], "answer": 1}
    text: "Question: {{q}}\\nAnswer:"
    choices: "options"
    gold: "answer"

An image task adds ``image:``, an expression giving the row's image path (or a list of paths,
relative to the task file like ``data_files``); a vision-language model then scores each choice
after a chat turn holding the image(s) and ``text``. The built-in image tasks of
``forgetless.vlm.tasks`` (``count_shapes``, ``read_clock``, ...) are such tasks, drawn once
into the cache.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import random
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from forgetless.errors import ForgetlessError
from forgetless.paths import cache_dir, shared_data_dir
from forgetless.vlm.images import check_image
from forgetless.vlm.tasks import DEFAULT_SIZE, IMAGE_TASKS, image_task_rows

# Sandboxed: a task file is data, and its expressions must not reach Python internals.
_JINJA = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass(frozen=True)
class TaskSpec:
    """One multiple-choice task. Field names follow lm-eval's task YAML where one exists."""

    name: str
    text: str | None = None  # Jinja template -> the context (doc_to_text)
    choices: str | None = None  # Jinja expression -> list of answer strings (doc_to_choice)
    gold: str = "label"  # Jinja expression -> index of the right choice
    # Partial scoring (WinoGrande): one context per option, one shared continuation.
    contexts: str | None = None  # Jinja expression -> list of contexts
    continuation: str | None = None  # Jinja template -> the shared continuation
    data_files: dict[str, str] = field(default_factory=dict)  # split -> file or glob
    labels_files: dict[str, str] = field(default_factory=dict)  # split -> one label per line
    dataset: str | None = None  # Hub dataset id, instead of data_files
    dataset_name: str | None = None
    split: str = "test"
    columns: list[str] | None = None  # for CSV files without a header row
    fields: dict[str, str] = field(default_factory=dict)  # derived fields: name -> expression
    id: str | None = None  # expression for a stable item id; default "<file>:<row>"
    description: str = ""  # Jinja template put once before the few-shot examples
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_split: str | None = None
    fewshot_sampler: str = "first_n"  # first_n | random
    fewshot_match: str | None = None  # a field shots must share with the item (MMLU subject)
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    base_dir: str | None = None  # folder relative data paths resolve against
    image: str | None = None  # Jinja expression -> image path(s) of a row (image tasks)
    # Code tasks (HumanEval): greedy completion of ``text``, run as text + completion + ``check``
    # in ``forgetless.eval.sandbox`` (``pass@1``); ``target`` is the reference continuation
    # whose log-probability given ``text`` is the continuous measure (``gold_logprob``).
    output_type: str = "multiple_choice"  # multiple_choice | generate_until
    target: str | None = None  # Jinja template -> reference continuation (generate_until)
    check: str | None = None  # Jinja template -> code run after the completion
    until: list[str] = field(default_factory=list)  # stop strings for the completion
    max_new_tokens: str = "256"

    @property
    def generates(self) -> bool:
        return self.output_type == "generate_until"

    def __post_init__(self) -> None:
        if self.output_type not in ("multiple_choice", "generate_until"):
            raise ForgetlessError(f"task '{self.name}': output_type must be multiple_choice or "
                                  f"generate_until, not '{self.output_type}'")
        if self.generates:
            if self.text is None or self.target is None or self.check is None:
                raise ForgetlessError(f"task '{self.name}': generate_until needs 'text', "
                                      "'target' and 'check'")
            if not self.max_new_tokens.isdigit() or int(self.max_new_tokens) < 1:
                raise ForgetlessError(f"task '{self.name}': max_new_tokens must be a positive "
                                      "integer")
            for key in ("text", "target", "check"):
                self._compile(key, template=True)
            return
        multiple_choice = self.text is not None and self.choices is not None
        partial = self.contexts is not None and self.continuation is not None
        if multiple_choice == partial:
            raise ForgetlessError(
                f"task '{self.name}': give either 'text' and 'choices', or 'contexts' and "
                "'continuation'"
            )
        if not self.data_files and not self.dataset:
            raise ForgetlessError(f"task '{self.name}': give 'data_files' or a Hub 'dataset'")
        if self.fewshot_sampler not in ("first_n", "random"):
            raise ForgetlessError(
                f"task '{self.name}': fewshot_sampler must be first_n or random, "
                f"not '{self.fewshot_sampler}'"
            )
        unknown = set(self.metrics) - {"acc", "acc_norm"}
        if unknown:
            raise ForgetlessError(f"task '{self.name}': unknown metrics {sorted(unknown)}")
        for key in ("text", "description", "continuation"):
            self._compile(key, template=True)
        for key in ("choices", "gold", "contexts", "id", "image"):
            self._compile(key, template=False)

    def _compile(self, key: str, template: bool) -> Any:
        source = getattr(self, key)
        if source is None:
            return None
        try:
            if template:
                return _JINJA.from_string(source)
            return _JINJA.compile_expression(source, undefined_to_none=False)
        except jinja2.TemplateSyntaxError as err:
            raise ForgetlessError(f"task '{self.name}': bad {key} {source!r}: {err}") from err
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as err:
            raise ForgetlessError(f"task '{self.name}': bad {key} {source!r}: "
                                  f"{type(err).__name__}") from None

    @cached_property
    def _compiled(self) -> dict[str, Any]:
        keys = {"text": 1, "description": 1, "continuation": 1, "choices": 0, "gold": 0,
                "contexts": 0, "id": 0, "image": 0, "target": 1, "check": 1}
        compiled = {k: self._compile(k, bool(t)) for k, t in keys.items()}
        compiled["fields"] = {
            name: _JINJA.compile_expression(expr, undefined_to_none=False)
            for name, expr in self.fields.items()
        }
        return compiled


@dataclass(frozen=True)
class Item:
    """One scored question: a (context, continuation) request per choice and the gold index.

    ``norm_lengths`` are the character lengths lm-eval divides by for ``acc_norm``.
    """

    id: str
    requests: list[tuple[str, str]]
    gold: int
    norm_lengths: list[int]
    images: tuple[Any, ...] = ()  # image paths: the requests are about these images
    check: str | None = None  # generate_until: code run after prompt + completion


@dataclass
class LoadedTask:
    """A task's items for one run, plus what is needed to repeat it exactly."""

    spec: TaskSpec
    items: list[Item]
    total: int  # rows available before sampling
    files: dict[str, str]  # path (or Hub id) -> sha256 (or dataset fingerprint)


def builtin_tasks() -> list[str]:
    """Names of the task YAML files shipped in ``forgetless/tasks``."""
    folder = resources.files("forgetless") / "tasks"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_spec(name_or_path: str | TaskSpec) -> TaskSpec:
    """A built-in task name (YAML or image task), a path to a task YAML, or a ``TaskSpec``; its
    data files must exist (jobs call this before loading a model, so a missing file fails in a
    second)."""
    if isinstance(name_or_path, TaskSpec):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ForgetlessError(f"task file not found: {path}")
        return check_task_files(spec_from_yaml(_text(path, path.read_bytes()),
                                               source=str(path), base_dir=path.parent))
    builtin = resources.files("forgetless") / "tasks" / f"{name_or_path}.yaml"
    if not builtin.is_file():
        if name_or_path in IMAGE_TASKS:
            return image_task_spec(name_or_path)
        raise ForgetlessError(
            f"unknown task '{name_or_path}': built-ins are "
            f"{', '.join([*builtin_tasks(), *IMAGE_TASKS])}, or pass a task .yaml file"
        )
    return check_task_files(spec_from_yaml(builtin.read_text(), source=f"built-in {name_or_path}",
                                           base_dir=None))


def check_task_files(spec: TaskSpec) -> TaskSpec:
    """The data files ``spec`` reads exist (not read yet): a missing benchmark folder must fail
    before a model loads, not after it."""
    if not spec.dataset:
        for files in (spec.data_files, spec.labels_files):
            for split in dict.fromkeys(s for s in (spec.split, spec.fewshot_split) if s in files):
                _resolve(spec, files[split])
    return spec


def spec_from_yaml(text: str, source: str, base_dir: Path | None) -> TaskSpec:
    """Parse and validate a task YAML; every problem becomes a one-line ForgetlessError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).replace("\n", " ")
        raise ForgetlessError(f"task file {source} is not valid YAML: {first}") from err
    except RecursionError:
        raise ForgetlessError(f"task file {source} is not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ForgetlessError(f"task file {source} must hold a mapping of task fields")
    known = {f.name for f in fields(TaskSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ForgetlessError(f"task file {source}: unknown fields {unknown}")
    if "name" not in data:
        raise ForgetlessError(f"task file {source}: missing 'name'")
    if base_dir is not None and "base_dir" not in data:
        data["base_dir"] = str(base_dir)
    for key, value in data.items():
        kind = _FIELD_KINDS[key]
        if value is None and kind.endswith("?"):
            continue
        if not _is_kind(value, kind.rstrip("?")):
            raise ForgetlessError(f"task file {source}: '{key}' must be {_KIND_NAMES[kind]}")
    try:
        return TaskSpec(**data)
    except TypeError as err:
        raise ForgetlessError(f"task file {source}: {err}") from err


# What each TaskSpec field holds in a task file ("?": may be null), checked before use so that a
# wrong type is one line instead of an error deep inside Jinja or a file reader.
_FIELD_KINDS = {
    "name": "str", "text": "str?", "choices": "str?", "gold": "str", "contexts": "str?",
    "continuation": "str?", "data_files": "dict", "labels_files": "dict", "dataset": "str?",
    "dataset_name": "str?", "split": "str", "columns": "list?", "fields": "dict", "id": "str?",
    "description": "str", "target_delimiter": "str", "fewshot_delimiter": "str",
    "fewshot_split": "str?", "fewshot_sampler": "str", "fewshot_match": "str?",
    "metrics": "list", "base_dir": "str?", "image": "str?", "output_type": "str",
    "target": "str?", "check": "str?", "until": "list", "max_new_tokens": "str",
}
_KIND_NAMES = {"str": "a string", "str?": "a string or null", "dict": "a mapping of strings",
               "list": "a list of strings", "list?": "a list of strings or null"}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _text(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ForgetlessError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def load_task(
    spec: TaskSpec, limit: int | None = None, seed: int = 0, num_fewshot: int = 0,
    exclude: Collection[int] = (),
) -> LoadedTask:
    """Read the rows, pick ``limit`` of them with ``seed`` (same seed, same items) and render.
    ``exclude``: row indices the sample must not use (a test sample disjoint from a
    validation sample drawn from the same split, as ``forgetless tune`` needs)."""
    rows, files = _read_split(spec, spec.split)
    total = len(rows)
    chosen = sample_indices(total, limit, seed, exclude)
    shots: list[dict] = []
    if num_fewshot > 0 and spec.image:
        raise ForgetlessError(f"task '{spec.name}': few-shot examples with images are not "
                              "supported (num_fewshot 0)")
    if num_fewshot > 0:
        if not spec.fewshot_split:
            raise ForgetlessError(f"task '{spec.name}' has no few-shot split (fewshot_split)")
        shots, shot_files = _read_split(spec, spec.fewshot_split)
        files.update(shot_files)
    rng = random.Random(seed)
    items = []
    for index in chosen:
        row = rows[index]
        examples = _pick_shots(spec, shots, row, num_fewshot, rng) if num_fewshot else []
        items.append(_render(spec, row, examples))
    return LoadedTask(spec=spec, items=items, total=total, files=files)


def sample_indices(total: int, limit: int | None, seed: int,
                   exclude: Collection[int] = ()) -> list[int]:
    """``limit`` row indices drawn with ``seed``; without ``exclude`` the same draw as ever."""
    if exclude:
        skip = set(exclude)
        pool = [i for i in range(total) if i not in skip]
        if limit is None or limit >= len(pool):
            return pool
        return sorted(random.Random(seed).sample(pool, limit))
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def _pick_shots(spec: TaskSpec, shots: list[dict], row: dict, k: int, rng: random.Random):
    pool = shots
    if spec.fewshot_match:
        pool = [s for s in shots if s.get(spec.fewshot_match) == row.get(spec.fewshot_match)]
    pool = [s for s in pool if s is not row]
    if spec.fewshot_sampler == "first_n":
        return pool[:k]
    return rng.sample(pool, min(k, len(pool)))


def _evaluate(spec: TaskSpec, key: str, row: dict) -> Any:
    compiled = spec._compiled[key]
    try:
        value = compiled.render(**row) if hasattr(compiled, "render") else compiled(**row)
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
        return value
    except Exception as err:  # a template error names the task, field and row
        raise ForgetlessError(
            f"task '{spec.name}': cannot evaluate {key} on row {row.get('_file')}:"
            f"{row.get('_row')}: {type(err).__name__}: {err}"
        ) from err


def _qa(spec: TaskSpec, row: dict) -> tuple[list[str], list[str], int]:
    """(contexts, continuations, gold) of a row without few-shot examples or description."""
    gold = _evaluate(spec, "gold", row)
    if spec.contexts is not None:
        contexts = _evaluate(spec, "contexts", row)
        if isinstance(contexts, str) or not isinstance(contexts, list | tuple):
            raise ForgetlessError(f"task '{spec.name}': contexts must give a list, "
                                  f"got {contexts!r:.80}")
        contexts = [str(c) for c in contexts]
        continuations = [_evaluate(spec, "continuation", row)] * len(contexts)
    else:
        choices = _evaluate(spec, "choices", row)
        if isinstance(choices, str) or not hasattr(choices, "__len__"):
            raise ForgetlessError(f"task '{spec.name}': choices must give a list, got {choices!r}")
        continuations = [str(c) for c in choices]
        contexts = [_evaluate(spec, "text", row)] * len(continuations)
    try:
        gold = int(gold)
    except (TypeError, ValueError, OverflowError) as err:
        raise ForgetlessError(f"task '{spec.name}': gold must be an index, got {gold!r}") from err
    if not 0 <= gold < len(contexts):
        raise ForgetlessError(
            f"task '{spec.name}': gold index {gold} out of range for {len(contexts)} choices "
            f"(row {row.get('_file')}:{row.get('_row')})"
        )
    return contexts, continuations, gold


def _render(spec: TaskSpec, row: dict, shots: list[dict]) -> Item:
    """Build the prompts exactly as lm-eval's ``fewshot_context`` + ``construct_requests`` do."""
    if spec.generates:  # one request: (prompt, reference continuation); the check code beside
        item_id = _evaluate(spec, "id", row) if spec.id else f"{row['_file']}:{row['_row']}"
        prompt, target = _evaluate(spec, "text", row), _evaluate(spec, "target", row)
        return Item(str(item_id), [(prompt, target)], 0, [len(target)],
                    check=_evaluate(spec, "check", row))
    prefix = _evaluate(spec, "description", row) if spec.description else ""
    for shot in shots:
        contexts, continuations, gold = _qa(spec, shot)
        prefix += (
            contexts[gold] + spec.target_delimiter + continuations[gold] + spec.fewshot_delimiter
        )
    contexts, continuations, gold = _qa(spec, row)
    requests = [(prefix + c, spec.target_delimiter + x) for c, x in zip(contexts, continuations)]
    # lm-eval normalises by the length of doc_to_choice: the options for MC, contexts otherwise.
    options = contexts if spec.contexts is not None else continuations
    item_id = _evaluate(spec, "id", row) if spec.id else f"{row['_file']}:{row['_row']}"
    images = _images(spec, row) if spec.image else ()
    return Item(str(item_id), requests, gold, [len(o) for o in options], images)


def _images(spec: TaskSpec, row: dict) -> tuple[Path, ...]:
    """A row's image paths, resolved like data files and checked readable now (one line)."""

    value = _evaluate(spec, "image", row)
    values = [value] if isinstance(value, str) else value
    where = f"task '{spec.name}' row {row.get('_file')}:{row.get('_row')}"
    if not isinstance(values, list | tuple) or not values or not all(
            isinstance(v, str) and v for v in values):
        raise ForgetlessError(f"{where}: image must give a path or a list of paths")
    base = Path(spec.base_dir) if spec.base_dir else shared_data_dir()
    paths = []
    for text in values:
        path = Path(text).expanduser()
        paths.append(check_image(path if path.is_absolute() else base / path, where))
    return tuple(paths)


IMAGE_TASK_ITEMS = 200  # test examples drawn for a built-in image task (distinct ones kept)


def image_task_spec(name: str, n: int = IMAGE_TASK_ITEMS, seed: int = 0) -> TaskSpec:
    """A built-in image task as a multiple-choice ``TaskSpec``: its test split drawn once into
    the cache (PNGs + ``test.jsonl``), so it is scored and hashed like any task file."""
    import os
    import shutil
    import tempfile

    folder = cache_dir() / "image_tasks" / f"{name}-{DEFAULT_SIZE}px-n{n}-seed{seed}"
    if not (folder / "test.jsonl").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".draw-", dir=folder.parent))
        try:
            unique = {row.key: row for row in image_task_rows(name, "test", n, seed)}
            lines = []
            for i, row in enumerate(unique.values()):
                row.image.save(tmp / f"{i:04d}.png")
                lines.append(json.dumps({"id": f"test:{i}", "image": f"{i:04d}.png",
                                         "prompt": row.prompt, "choices": list(row.choices),
                                         "gold": row.gold}))
            (tmp / "test.jsonl").write_text("\n".join(lines) + "\n")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process drew it first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return TaskSpec(name=name, text="{{ prompt }}", choices="choices", gold="gold",
                    image="image", id="id", data_files={"test": "test.jsonl"},
                    base_dir=str(folder), metrics=["acc"])


def _resolve(spec: TaskSpec, pattern: str) -> list[Path]:
    base = Path(spec.base_dir) if spec.base_dir else shared_data_dir()
    full = Path(pattern).expanduser()
    if not full.is_absolute():
        full = base / full
    paths = sorted(Path(p) for p in glob.glob(str(full)))
    if not paths:
        raise ForgetlessError(f"task '{spec.name}': data file not found: {full}")
    return paths


def _read_split(spec: TaskSpec, split: str) -> tuple[list[dict], dict[str, str]]:
    if spec.dataset:
        return _read_hub(spec, split)
    if split not in spec.data_files:
        raise ForgetlessError(
            f"task '{spec.name}': no data file for split '{split}' "
            f"(has {', '.join(spec.data_files) or 'none'})"
        )
    rows: list[dict] = []
    files: dict[str, str] = {}
    label_paths = _resolve(spec, spec.labels_files[split]) if split in spec.labels_files else []
    paths = _resolve(spec, spec.data_files[split])
    if label_paths and len(label_paths) != len(paths):
        raise ForgetlessError(f"task '{spec.name}': need one labels file per data file")
    for i, path in enumerate(paths):
        raw = _read_bytes(spec, path)
        files[str(path)] = hashlib.sha256(raw).hexdigest()
        if path.suffix == ".gz":  # hashed as stored, parsed as its inner file (HumanEval)
            raw = _gunzip(spec, path, raw)
            path = path.with_suffix("")
        file_rows = _parse(spec, path, _text(path, raw))
        if label_paths:
            labels_raw = _read_bytes(spec, label_paths[i])
            files[str(label_paths[i])] = hashlib.sha256(labels_raw).hexdigest()
            labels = _text(label_paths[i], labels_raw).split()
            if len(labels) != len(file_rows):
                raise ForgetlessError(
                    f"task '{spec.name}': {label_paths[i]} has {len(labels)} labels for "
                    f"{len(file_rows)} rows in {path}"
                )
            for row, label in zip(file_rows, labels):
                row["label"] = label
        for r, row in enumerate(file_rows):
            row["_file"], row["_row"] = path.stem, r
            for name in spec.fields:
                row[name] = _evaluate_field(spec, name, row)
        rows += file_rows
    return rows, files


def _read_bytes(spec: TaskSpec, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ForgetlessError(f"task '{spec.name}': cannot read {path}: {err.strerror}") from None


def _gunzip(spec: TaskSpec, path: Path, raw: bytes) -> bytes:
    import gzip

    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise ForgetlessError(f"task '{spec.name}': cannot decompress {path}: {err}") from None


def _evaluate_field(spec: TaskSpec, name: str, row: dict) -> Any:
    try:
        value = spec._compiled["fields"][name](**row)
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
        return value
    except Exception as err:
        raise ForgetlessError(f"task '{spec.name}': cannot compute field '{name}': {err}") from err


def _parse(spec: TaskSpec, path: Path, text: str) -> list[dict]:
    try:
        if path.suffix == ".csv":
            reader = csv.reader(io.StringIO(text, newline=""))
            records = list(reader)
            if spec.columns:
                bad = [i for i, r in enumerate(records) if len(r) != len(spec.columns)]
                if bad:
                    raise ForgetlessError(
                        f"task '{spec.name}': {path} row {bad[0]} has {len(records[bad[0]])} "
                        f"fields, expected {len(spec.columns)}"
                    )
                return [dict(zip(spec.columns, r)) for r in records]
            header, *body = records
            return [dict(zip(header, r)) for r in body]
        if path.suffix == ".json":
            data = json.loads(text)
            rows = data if isinstance(data, list) else data["data"]
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error, KeyError, ValueError, TypeError,
            RecursionError) as err:
        raise ForgetlessError(f"task '{spec.name}': cannot parse {path}: "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ForgetlessError(f"task '{spec.name}': {path} must hold a list of objects (rows)")
    return rows


def _read_hub(spec: TaskSpec, split: str) -> tuple[list[dict], dict[str, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_name, split=split)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ForgetlessError(
            f"task '{spec.name}': cannot load dataset {spec.dataset}: {first}"
        ) from err
    rows = []
    for r, row in enumerate(ds):
        row = dict(row)
        row["_file"], row["_row"] = f"{spec.dataset}:{split}", r
        for name in spec.fields:
            row[name] = _evaluate_field(spec, name, row)
        rows.append(row)
    return rows, {f"hf://{spec.dataset}/{spec.dataset_name or ''}/{split}": ds._fingerprint}
