"""`bpfprof agent`: the continuous profiler (agent/daemon/daemon.py), configured by file, environment and flags."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import click

from agent.daemon.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config

# syslog priorities by logging level: journald reads a "<N>" prefix on stderr lines.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class LogfmtFormatter(logging.Formatter):
    """`level=info logger=agent.daemon.daemon msg="..."`; with a `<N>` priority prefix under systemd (JOURNAL_STREAM)."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
        quoted = msg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        line = f'level={record.levelname.lower()} logger={record.name} msg="{quoted}"'
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"ts={ts} {line}"


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for h in root.handlers:
        h.setFormatter(LogfmtFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root.setLevel(level.upper())


def _listify(values: tuple) -> list | None:
    return list(values) if values else None


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"YAML config file. Default: $BPFPROF_CONFIG, else {DEFAULT_CONFIG_PATH} if it exists.")
@click.option("--check-config", is_flag=True, help="Validate the config, print the effective one, and exit.")
@click.option("--agent-log-level", "log_level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Key log_level.")
@click.option("--host-proc", default=None, help="Key host_proc: the host's /proc (default /proc).")
@click.option("--node-name", default=None, help="Key node_name: k8s.node.name.")
@click.option("--profile", "profiles", default=None, metavar="TYPES", help="Key profiling.profiles (comma-separated).")
@click.option("--frequency", type=int, default=None, help="Key profiling.frequency_hz.")
@click.option("--no-kernel", is_flag=True, default=None, help="Key profiling.kernel_stacks: false.")
@click.option("--pid", "pids", type=int, multiple=True, help="Key selection.pids (repeatable).")
@click.option("--exe", "exe_names", multiple=True, help="Key selection.exe_names (repeatable).")
@click.option("--exe-regex", multiple=True, help="Key selection.exe_regex (repeatable).")
@click.option("--cgroup", "cgroup_paths", multiple=True, help="Key selection.cgroup_paths (repeatable).")
@click.option("--container-id", "container_ids", multiple=True, help="Key selection.container_ids (repeatable).")
@click.option("--interval", type=float, default=None, help="Key export.interval_s.")
@click.option("--export-timeout", type=float, default=None, help="Key export.timeout_s.")
@click.option("--queue-max-batches", type=int, default=None, help="Key export.queue_max_batches.")
@click.option("--otlp-endpoint", default=None, help="Key export.otlp.endpoint.")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http"]), default=None, help="Key export.otlp.protocol.")
@click.option("--otlp-insecure", is_flag=True, default=None, help="Key export.otlp.insecure.")
@click.option("--pprof-dir", default=None, help="Key export.pprof_dir.path.")
@click.option("--viewer-endpoint", default=None, help="Key export.viewer.endpoint.")
@click.option("--max-processes", type=int, default=None, help="Key limits.max_processes.")
@click.option("--max-symbol-files", type=int, default=None, help="Key limits.max_symbol_files.")
@click.option("--metrics-listen", default=None, help="Key metrics.listen (\"\" turns it off).")
def agent(config_path: str | None, check_config: bool, log_level: str | None, host_proc: str | None,
          node_name: str | None, profiles: str | None, frequency: int | None, no_kernel: bool | None,
          pids: tuple[int, ...], exe_names: tuple[str, ...], exe_regex: tuple[str, ...],
          cgroup_paths: tuple[str, ...], container_ids: tuple[str, ...], interval: float | None,
          export_timeout: float | None, queue_max_batches: int | None, otlp_endpoint: str | None,
          otlp_protocol: str | None, otlp_insecure: bool | None, pprof_dir: str | None,
          viewer_endpoint: str | None, max_processes: int | None, max_symbol_files: int | None,
          metrics_listen: str | None) -> None:
    """Profile continuously and export every interval (OTLP, pprof directory, viewer).

    \b
    Every flag sets one config key; flags > environment > file > defaults.
    SIGHUP reloads the config (a bad one is logged and the old one kept);
    SIGTERM/SIGINT export what was collected and exit 0.
    See packaging/config.example.yaml for every key.
    """
    flags = {
        "log_level": log_level, "host_proc": host_proc, "node_name": node_name,
        "profiling.profiles": profiles, "profiling.frequency_hz": frequency,
        "profiling.kernel_stacks": False if no_kernel else None,
        "selection.pids": _listify(pids), "selection.exe_names": _listify(exe_names),
        "selection.exe_regex": _listify(exe_regex), "selection.cgroup_paths": _listify(cgroup_paths),
        "selection.container_ids": _listify(container_ids),
        "export.interval_s": interval, "export.timeout_s": export_timeout,
        "export.queue_max_batches": queue_max_batches, "export.otlp.endpoint": otlp_endpoint,
        "export.otlp.protocol": otlp_protocol, "export.otlp.insecure": True if otlp_insecure else None,
        "export.pprof_dir.path": pprof_dir, "export.viewer.endpoint": viewer_endpoint,
        "limits.max_processes": max_processes, "limits.max_symbol_files": max_symbol_files,
        "metrics.listen": metrics_listen,
    }

    def load(remote: dict | None = None) -> AgentConfig:
        """The local config (file, environment, flags), with the last remote config (OpAMP) on top."""
        return load_config(config_path, flags, remote=remote)

    cfg = load()
    if check_config:
        from agent.daemon.config import effective_config_text  # noqa: PLC0415

        click.echo(effective_config_text(cfg), nl=False)
        return
    setup_logging(cfg.log_level)
    if cfg.export.pprof_dir.path:
        Path(cfg.export.pprof_dir.path).mkdir(parents=True, exist_ok=True)

    from agent.daemon.daemon import Daemon  # noqa: PLC0415  (loads the probe modules)

    daemon = Daemon(cfg, reload_config=load)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    code = daemon.run()
    raise click.exceptions.Exit(code)
