"""The one way tests run the `lrq` command line: in process (click's CliRunner), an unexpected
exception raised as it is (a test sees its traceback) rather than folded into an exit code."""

from __future__ import annotations

from click.testing import CliRunner

from lrq_deploy.cli import main


def invoke(*args):
    """The CliRunner result of `lrq ARGS` (exit_code, output: stdout and stderr together)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
