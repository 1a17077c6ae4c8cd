"""`bpfprof doctor`: one line per check with OK/FAIL and the fix."""

from __future__ import annotations

import click

from agent.capture import readiness as checks


@click.command()
@click.option("--fix", is_flag=True, help="Mount tracefs/debugfs and link installed kernel headers (root).")
def doctor(fix: bool) -> None:
    """Check that this machine can run a capture. Exit 0 only if it can."""
    if fix:
        for line in checks.fix_mounts():
            click.echo(f"fix: {line}")
    results = checks.run_checks(fix=fix)
    width = max(len(c.name) for c in results)
    for c in results:
        status = "OK  " if c.ok else ("FAIL" if c.required else "WARN")
        line = f"{status} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> fix: {c.fix}"
        click.echo(line)
    if any(c.required and not c.ok for c in results):
        raise SystemExit(1)
