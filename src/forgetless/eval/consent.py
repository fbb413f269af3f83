"""Consent before model-written code runs, and a word when it cannot be isolated.

A code task (``output_type: generate_until``, e.g. humaneval) executes the programs the model
writes. As in lm-evaluation-harness, that needs an explicit opt-in: ``--confirm-run-unsafe-code``
(eval, compare, continual, check), the config key ``confirm_run_unsafe_code: true`` (compare,
continual, tune) or the environment variable ``HF_ALLOW_CODE_EVAL=1`` (the one lm-eval and HF
``evaluate``'s ``code_eval`` read). Where the sandbox cannot isolate the programs (an OS that
refuses user namespaces: then they run with rlimits only and can write wherever this user can),
a second opt-in is needed: ``--allow-unisolated-code``, ``allow_unisolated_code: true`` or
``FORGETLESS_ALLOW_UNISOLATED=1``; the run then says so on one line.

The flags and config keys grant consent for this process by setting those environment
variables (lm-eval's mechanism too), so the evaluator, which checks again before it runs any
program (the Python API has no flag), sees the same answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from forgetless.errors import ForgetlessError

CODE_ENV = "HF_ALLOW_CODE_EVAL"
UNISOLATED_ENV = "FORGETLESS_ALLOW_UNISOLATED"
# The command-line flags' help, shared by every command that can run a code task.
CONFIRM_HELP = ("Allow code tasks (humaneval) to run model-written programs in the sandbox "
                f"(also: {CODE_ENV}=1, as lm-eval).")
UNISOLATED_HELP = ("Also allow them where the sandbox cannot isolate them (user namespaces "
                   f"refused: rlimits only; also: {UNISOLATED_ENV}=1).")
_warned = False  # the unisolated warning: once per process, not once per evaluation


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def grant(confirm_run_unsafe_code: bool = False, allow_unisolated_code: bool = False) -> None:
    """Record the user's opt-ins (flags, config keys) for this process."""
    if confirm_run_unsafe_code:
        os.environ[CODE_ENV] = "1"
    if allow_unisolated_code:
        os.environ[UNISOLATED_ENV] = "1"


def consent_overrides(confirm_run_unsafe_code: bool, allow_unisolated_code: bool) -> list[str]:
    """The flags as config overrides (compare, continual): the config key is the one place."""
    return [f"{key}=true" for key, given in (("confirm_run_unsafe_code", confirm_run_unsafe_code),
                                             ("allow_unisolated_code", allow_unisolated_code))
            if given]


def code_tasks(suite: Iterable) -> list[str]:
    """Names of the suite's tasks that execute model-written code (loads only the task specs)."""
    from forgetless.eval.tasks import load_spec

    return [spec.name for spec in map(load_spec, suite) if spec.generates]


def missing_isolation() -> list[str]:
    """What the sandbox cannot enforce here (empty: fully isolated), from one trivial run.
    (Imports stay inside: the CLI imports this module for its help texts at start-up.)"""
    from forgetless.eval.sandbox import FULL_ISOLATION, run_python

    held = run_python("pass").isolation
    return [part for part in FULL_ISOLATION if part not in held]


def require_code_consent(suite: Iterable, confirm_run_unsafe_code: bool = False,
                         allow_unisolated_code: bool = False) -> None:
    """Jobs call this before any model loads: refuse a suite with code tasks unless the user
    opted in (and, where the sandbox cannot isolate, opted into unisolated runs too)."""
    grant(confirm_run_unsafe_code, allow_unisolated_code)
    names = code_tasks(suite)
    if names:
        check_code_execution(names)


def check_code_execution(names: list[str]) -> None:
    """The consent and isolation checks for tasks ``names`` (the evaluator's, before it runs
    any program): one ``ForgetlessError`` line saying how to opt in, or a one-line warning."""
    global _warned
    which = ", ".join(names)
    if not _env_true(CODE_ENV):
        raise ForgetlessError(
            f"task {which} runs model-written code: opt in with --confirm-run-unsafe-code "
            f"(config: confirm_run_unsafe_code: true; environment: {CODE_ENV}=1)")
    missing = missing_isolation()
    if not missing:
        return
    what = ", ".join(missing)
    if not _env_true(UNISOLATED_ENV):
        raise ForgetlessError(
            f"the sandbox cannot isolate model-written code here (no {what} isolation: user "
            f"namespaces refused), so task {which} would run with resource limits only and "
            "could write wherever you can; to run it anyway add --allow-unisolated-code "
            f"(config: allow_unisolated_code: true; environment: {UNISOLATED_ENV}=1)")
    if not _warned:
        print(f"forgetless: warning: running model-written code of task {which} without "
              f"{what} isolation (user namespaces refused; allowed by --allow-unisolated-code)",
              file=sys.stderr, flush=True)
        _warned = True


__all__ = ["CODE_ENV", "CONFIRM_HELP", "UNISOLATED_ENV", "UNISOLATED_HELP",
           "check_code_execution", "code_tasks", "consent_overrides", "grant",
           "missing_isolation", "require_code_consent"]
