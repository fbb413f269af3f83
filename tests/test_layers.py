"""Imports run one way through the layers (ARCHITECTURE.md), and no module reaches into another
module's private names. Read from the source's AST (every import: top-level, function-local and
under TYPE_CHECKING), so it costs no imports and fails on the line that breaks the rule.

Known exceptions are listed in ``ALLOWED`` with their reason; an entry that no longer matches
any import fails too, so the list only shrinks (tighten it by deleting lines)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top: a module may import modules of its own layer and of the layers below. The root
# package ``forgetless`` (its ``__version__``, lazy ``MoFO`` / ``ForgettingMonitor``) is the
# public face: anything may read ``forgetless.__version__``, and it may name anything lazily.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "paths", "io", "runs", "overlap")),
    ("vlm", ("vlm",)),  # below data and models: they import it, never the reverse
    ("core", ("models", "data", "optim", "config", "devices", "rehearsal", "replay")),
    ("eval/methods", ("eval", "methods", "mixing")),
    ("jobs", ("train", "jobs", "compare", "continual", "tune", "check", "plan", "report",
              "pooling", "tracking", "interpolate", "merging", "monitor", "updates", "progress",
              "verdict")),
    ("cli", ("cli", "__main__")),
]

# (importer, imported or "imported:_name"): why it is allowed for now.
ALLOWED: dict[tuple[str, str], str] = {
    ("forgetless.config", "forgetless.methods"):
        "TrainConfig validates method names (methods.parse_method)",
    ("forgetless.config", "forgetless.methods.options"):
        "TrainConfig takes each method option's default from methods.options, where it is "
        "declared once (a leaf module: only errors)",
    ("forgetless.config", "forgetless.mixing"):
        "a mix: source is checked as the config validates, before any model loads (imported "
        "when a mix: entry is validated: mixing reads the eval task registry)",
    ("forgetless.eval", "forgetless.cli.eval"):
        "forgetless.eval.eval_command stays a public name (resolved lazily)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """``(imported module, name or "", line)`` of every forgetless import in ``path``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names
                      if a.name.split(".")[0] == "forgetless"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            if module.split(".")[0] != "forgetless":
                continue
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if module == "forgetless" and alias.name != "__version__":
                    found.append((submodule, "", node.lineno))  # ``from forgetless import x``
                else:
                    found.append((module, alias.name, node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the root package
    for rank, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    return None


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "forgetless").rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "forgetless" and _layer(m) is None]
    assert not missing, f"add these modules to a layer in LAYERS: {missing}"


def _violations() -> tuple[list[str], set[tuple[str, str]]]:
    modules = _modules()
    problems, used = [], set()
    for me, path in modules.items():
        mine = _layer(me)
        for imported, name, line in _imports(path):
            where = f"{path.relative_to(SRC)}:{line}"
            target = imported
            if name and f"{imported}.{name}" in modules:  # ``from package import submodule``
                target, name = f"{imported}.{name}", ""
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                key = (me, target)
                if key in ALLOWED or (me, target.rpartition(".")[0]) in ALLOWED:
                    used.add(key if key in ALLOWED else (me, target.rpartition(".")[0]))
                else:
                    problems.append(f"{where}: {me} ({LAYERS[mine][0]}) imports {target} "
                                    f"({LAYERS[theirs][0]}), a layer above it")
            if name.startswith("_") and not name.startswith("__") and target != me:
                key = (me, f"{target}:{name}")
                if key in ALLOWED:
                    used.add(key)
                else:
                    problems.append(f"{where}: {me} imports {target}'s private name {name}")
    return problems, used


def test_imports_run_down_the_layers_and_leave_private_names_alone():
    problems, _ = _violations()
    assert not problems, "\n".join(problems)


def test_every_allowed_exception_is_still_needed():
    _, used = _violations()
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"these ALLOWED entries no longer match an import; delete them: {stale}"


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check itself can fail: a vlm module importing data is reported."""
    fake = tmp_path / "forgetless"
    (fake / "vlm").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data.py").write_text("X = 1\n")
    (fake / "vlm" / "__init__.py").write_text("")
    (fake / "vlm" / "bad.py").write_text("def f():\n    from forgetless.data import X, _y\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    problems, _ = _violations()
    assert any("forgetless.vlm.bad (vlm) imports forgetless.data (core)" in p for p in problems)
    assert any("private name _y" in p for p in problems)


def test_the_cli_starts_without_torch():
    """``forgetless --help`` stays fast: the CLI imports each job inside its command, and
    ``import forgetless`` resolves MoFO and ForgettingMonitor only when asked for."""
    import subprocess

    code = ("import sys, forgetless.cli; print([m for m in ('torch', 'transformers', 'mlflow') "
            "if m in sys.modules])")
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
