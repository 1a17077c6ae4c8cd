"""`bpfprof doctor`: one line per check with OK/FAIL and the fix."""

from __future__ import annotations

from pathlib import Path

import click

from agent.capture import readiness as checks
from agent.daemon.config import AgentConfig, load_config
from agent.daemon.selection import Selector
from agent.probes.family import ProbeConfig
from agent.processes.stack_resolver import UnwindMode


def agent_selection(cfg: AgentConfig) -> checks.Selection:
    """What `bpfprof agent` with this config loads (as agent/daemon/daemon.py BpfCollector builds it)."""
    p = cfg.profiling
    pids = tuple(cfg.selection.pids) if Selector(cfg.selection).pid_only else None
    config = ProbeConfig(frequency_hz=p.frequency_hz, with_kernel=p.kernel_stacks,
                         offcpu_min_ns=p.offcpu_min_us * 1000, heap_sample_bytes=p.heap_sample_bytes,
                         pids=pids, unwind=UnwindMode(p.unwind), unwind_table_bytes=p.unwind_table_bytes)
    return checks.Selection("agent", config, tuple(p.profiles), pids is not None, False)


@click.command()
@click.option("--fix", is_flag=True, help="Mount tracefs/debugfs, link installed kernel headers and compile the "
              "default probe selections into the BPF cache (root).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The agent's config file (default: the one `bpfprof agent` reads): its probe selection is "
              "checked, and compiled with --fix, too.")
def doctor(fix: bool, config_path: Path | None) -> None:
    """Check that this machine can run a capture. Exit 0 only if it can."""
    if fix:
        for line in checks.fix_mounts():
            click.echo(f"fix: {line}")
    # None: the agent's own choice ($BPFPROF_CONFIG, else the default file if present, else defaults)
    cfg = load_config(str(config_path) if config_path is not None else None)
    results = checks.run_checks(fix=fix, selections=[*checks.default_selections(), agent_selection(cfg)])
    width = max(len(c.name) for c in results)
    for c in results:
        status = "OK  " if c.ok else ("FAIL" if c.required else "WARN")
        line = f"{status} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> fix: {c.fix}"
        click.echo(line)
    if any(c.required and not c.ok for c in results):
        raise SystemExit(1)
