"""`bpfprof`: the click group. Each subcommand lives in agent/commands/.

This is the only place that turns a BpfprofError into a message and an exit
code: one line on stderr, exit 2, no traceback.
"""

from __future__ import annotations

import importlib
import logging
import resource
import sys

import click

from symbolizer.errors import BpfprofError

EXIT_USAGE = 2


# Subcommand -> "module:function". Imported only when that command runs: the
# agent's start-up is on the path to its first sample, and `record` must not
# pay for gRPC, SQLite or the viewer. serve, view and diff --html import viewer, which only the
# CLI (the top of the import graph) may do.
COMMANDS = {
    "record": "agent.commands.record:record",
    "doctor": "agent.commands.doctor:doctor",
    "convert": "agent.commands.convert:convert",
    "view": "agent.commands.view:view",
    "diff": "agent.commands.diff:diff",
    "serve": "agent.commands.serve:serve",
    "agent": "agent.commands.agent:agent",
}


# Commands whose cached BPF programs are loaded while they import (agent/bpfload/preload.py).
PRELOADS = frozenset({"record", "agent"})


class _Group(click.Group):
    """Click group with lazily imported subcommands, whose errors are one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] in PRELOADS:
            # before the command's imports: its BPF programs verify in the kernel meanwhile
            from agent.bpfload import preload  # noqa: PLC0415  (only for the commands that load BPF)

            preload.start(args[0], args[1:])
        return super().resolve_command(ctx, args)

    def main(self, *args, **kwargs):  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)  # bare `bpfprof`: the help, as click does
            sys.exit(EXIT_USAGE)
        except click.UsageError as e:
            _fail(e.format_message(), e.ctx)
        except BpfprofError as e:
            _fail(str(e))
        except click.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, ctx: click.Context | None = None) -> None:
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    click.echo(f"bpfprof: error: {message}{hint}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Log level of messages on stderr.")
def main(log_level: str) -> None:
    """bpfprof: an eBPF profiler for Go and native programs."""
    _raise_open_files_limit()
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="bpfprof: %(levelname)s: %(name)s: %(message)s")


def _raise_open_files_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one, as Go's runtime does at start.

    Each file the symbol cache holds stays open (files are read, never
    mapped: symbolizer/elf.py), and systemd's default soft limit is 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit: files past it are counted as unreadable
