"""The ``forgetless`` command line: one sub-command per job, one module per verb in this package.

Each verb's module declares its options and imports its job inside the command function, so
``forgetless --help`` (and a usage error) costs only typer: the library modules below are free
to import what they need at their top.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import traceback

import typer

from forgetless import __version__
from forgetless.cli.check import check_command
from forgetless.cli.compare import compare_command
from forgetless.cli.continual import continual_command
from forgetless.cli.eval import eval_command
from forgetless.cli.plan import plan_command
from forgetless.cli.train import train_command
from forgetless.cli.tune import tune_command
from forgetless.errors import ForgetlessError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # --debug tracebacks: locals may hold whole tensors
    help="Fine-tune language models without catastrophic forgetting, and measure it.",
)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks (also: FORGETLESS_DEBUG=1), for bug reports."
    ),
) -> None:
    """Keep sub-commands even while only one is registered (typer would otherwise flatten)."""
    if debug:
        os.environ["FORGETLESS_DEBUG"] = "1"


# One line per verb, in the order ``forgetless --help`` lists them.
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("continual")(continual_command)
app.command("check")(check_command)
app.command("compare")(compare_command)
app.command("plan")(plan_command)
app.command("tune")(tune_command)


# Click's exceptions as typer raises them: recent typer vendors click (``typer._click``), older
# typer uses click itself, so they are found from a class typer exports in both cases.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_click_exceptions = sys.modules[_UsageError.__module__]
_NoArgsIsHelp = getattr(_click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
_Abort = (typer.Abort, getattr(_click_exceptions, "Abort", typer.Abort))  # the same in old typer


def _debug() -> bool:
    return os.environ.get("FORGETLESS_DEBUG", "").lower() not in ("", "0", "false", "no")


def main() -> None:
    """Console entry point; see ``_main``. A process of a multi-process launch leaves through
    ``_leave_launch`` with the same exit code."""
    try:
        _main()
    except SystemExit as done:
        _leave_launch(done.code)
        raise
    _leave_launch(0)


def _main() -> None:
    """Every failure is one line on stderr unless ``--debug`` is given.

    * ``ForgetlessError`` (bad input): the message, exit code 2;
    * a usage error (unknown option or command, a malformed or missing value): click's message
      and the sub-command's ``--help`` on one line, exit code 2 (not typer's boxed usage);
    * Ctrl-C: "interrupted", exit code 130 (a re-run resumes what was finished);
    * ``OSError`` / ``MemoryError`` (disk full, no permission, out of memory): the reason, exit 1;
    * anything else is a bug: one line naming it, exit 1; its full traceback goes to a file at
      once (re-running a long job with ``--debug`` just to see it would cost the job again).
    """
    try:
        code = app(standalone_mode=False)  # click's usage errors reach us, not its box
        if isinstance(code, int) and code:  # typer.Exit(code); Ctrl-C: 130 (said below)
            sys.exit(code)
    except _NoArgsIsHelp as err:  # a bare ``forgetless``: the overview
        err.show()
        sys.exit(err.exit_code)
    except _ClickException as err:
        print(f"forgetless: error: {_usage_error(err)}", file=sys.stderr)
        sys.exit(2 if isinstance(err, _UsageError) else err.exit_code)
    except _Abort:
        print("forgetless: interrupted", file=sys.stderr)
        sys.exit(130)
    except ForgetlessError as err:
        if _debug():
            traceback.print_exc()
        print(f"forgetless: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as done:
        if done.code == 130:  # typer turns Ctrl-C into exit 130, silently
            print("forgetless: interrupted", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("forgetless: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, MemoryError) as err:
        if _debug():
            raise
        print(f"forgetless: error: {_describe(err)}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if _debug():
            raise
        where = _save_traceback()
        print(f"forgetless: error: internal error, this is a bug ({type(err).__name__}: "
              f"{_first_line(err)}); traceback in {where} (or rerun with --debug)",
              file=sys.stderr)
        sys.exit(1)


def _leave_launch(code: object) -> None:
    """Under ``accelerate launch`` / torchrun, exit without Python's finalization.

    A gloo worker thread that drops the last reference to a finished collective's tensors
    while the interpreter finalizes aborts the process ("terminate called without an active
    exception", SIGABRT; pytorch#179291), so a rank that finished and saved everything fails
    the launch now and then. ``destroy_process_group`` does not stop those threads while
    anything else still holds the group (after a DDP run all of them were still running). So:
    end the group after success (not after a failure: the other ranks may wait in a
    collective), run the exit handlers (MLflow, logging), flush, and ``os._exit`` with the
    command's code. A process outside a launch (``WORLD_SIZE`` unset or 1) exits as usual.
    """
    torch = sys.modules.get("torch")  # never imported (``--help``, a usage error): nothing to end
    dist = getattr(torch, "distributed", None)
    launched = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")
    if not launched or dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if isinstance(code, str):  # SystemExit("message"): Python would print it
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if status == 0:
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _usage_error(err: Exception) -> str:
    """Click's message on one line, naming the help of the (sub-)command it concerns."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is None:
        return message
    names = []  # the sub-command's name, not the program's ("python -m forgetless")
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return f"{message} (see {' '.join(['forgetless', *reversed(names)])} --help)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _describe(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "out of memory (try a smaller batch_size or max_length)"
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return f"{type(err).__name__}: {_first_line(err)}"


def _save_traceback() -> str:
    """Write the current exception's traceback to a temporary file; returns its path."""
    try:
        fd, path = tempfile.mkstemp(prefix="forgetless-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"forgetless {__version__}, python {sys.version.split()[0]}\n")
            handle.write(" ".join(sys.argv) + "\n\n")
            traceback.print_exc(file=handle)
        return path
    except OSError:
        return "(could not be saved)"
