"""`bpfprof`: the click group. Each subcommand lives in agent/commands/.

This is the only place that turns a BpfprofError into a message and an exit
code: one line on stderr, exit 2, no traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from symbolizer.errors import BpfprofError

EXIT_USAGE = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BpfprofError as e:
            click.echo(f"bpfprof: error: {e}", err=True)
            ctx.exit(EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Log level of messages on stderr.")
def main(log_level: str) -> None:
    """bpfprof: an eBPF profiler for Go and native programs."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="bpfprof: %(levelname)s: %(name)s: %(message)s")


def _register() -> None:
    from agent.commands import doctor, record  # noqa: PLC0415  (commands import the CLI group)

    main.add_command(record.record)
    main.add_command(doctor.doctor)


_register()
