"""Finding kernel headers BCC can compile against, in the order DESIGN.md sets.

1. the running kernel's own: /lib/modules/$(uname -r)/build
2. BCC_KERNEL_SOURCE from the environment
3. /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS; BCC unpacks it itself)
4. the newest installed /usr/src/linux-headers-*, with a warning: linked as
   /lib/modules/$(uname -r)/{build,source}, which is how BCC finds Debian's
   split build/common trees (BCC_KERNEL_SOURCE pointing at either tree alone
   fails: kconfig.h is in the other one).

Headers of another version are fine for bpfprof's programs because they read
no kernel struct through those headers; offsets they need come from BTF.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import KernelHeadersError

ENV_KERNEL_SOURCE = "BCC_KERNEL_SOURCE"
KHEADERS_ARCHIVE = Path("/sys/kernel/kheaders.tar.xz")
USR_SRC = Path("/usr/src")
PACKAGE_HINT = "install them: apt-get install linux-headers-amd64 (or linux-headers-$(uname -r))"


class HeaderSource(enum.StrEnum):
    RUNNING_KERNEL = "running kernel"
    ENVIRONMENT = ENV_KERNEL_SOURCE
    KHEADERS = "kheaders"
    NEWEST_INSTALLED = "newest installed"


@dataclass(frozen=True)
class KernelHeaders:
    """Which headers BCC will use, and why (for `doctor` and the logs)."""

    source: HeaderSource
    path: Path
    version: str  # the headers' kernel release, "" if unknown
    running: str  # uname -r
    warning: str = ""

    def describe(self) -> str:
        mismatch = "" if not self.version or self.version == self.running else f" (headers {self.version}, kernel {self.running})"
        return f"{self.source.value}: {self.path}{mismatch}"


def _headers_release(tree: Path) -> str:
    for rel in ("include/config/kernel.release",):
        p = tree / rel
        if p.is_file():
            return p.read_text().strip()
    m = re.match(r"linux-headers-(.+)$", tree.name)
    return m.group(1) if m else ""


def _has_headers(tree: Path) -> bool:
    """A tree BCC can build against: Makefile plus include/ (here or in ../source)."""
    return tree.is_dir() and ((tree / "include").is_dir() or (tree / "Makefile").is_file())


def _newest_installed(usr_src: Path) -> tuple[Path, Path] | None:
    """The newest Debian-style (build, common) header pair under /usr/src."""
    builds = []
    for d in usr_src.glob("linux-headers-*"):
        if d.name.endswith("-common") or not (d / "Makefile").is_file():
            continue
        common = None
        mk = (d / "Makefile").read_text(errors="replace")
        m = re.search(r"linux-headers-[^\s/]+-common", mk)  # Debian's build tree includes its common tree
        if m and (usr_src / m.group(0)).is_dir():
            common = usr_src / m.group(0)
        elif (d / "include" / "linux" / "kconfig.h").is_file():
            common = d
        if common is not None:
            builds.append((d, common))
    if not builds:
        return None

    def version_key(pair: tuple[Path, Path]) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", pair[0].name)]

    return max(builds, key=version_key)


def resolve(running: str | None = None, modules_root: Path = Path("/lib/modules"),
            usr_src: Path = USR_SRC, link: bool = False) -> KernelHeaders:
    """Pick kernel headers for BCC; raise KernelHeadersError naming the package if none.

    With `link`, case 4 creates the /lib/modules/<release>/{build,source}
    links BCC needs (root only); without it, case 4 is reported but unusable.
    """
    running = running or os.uname().release
    kdir = modules_root / running
    build = kdir / "build"
    if _has_headers(build):
        return KernelHeaders(HeaderSource.RUNNING_KERNEL, build, _headers_release(build.resolve()), running)
    env = os.environ.get(ENV_KERNEL_SOURCE)
    if env:
        if _has_headers(Path(env)):
            return KernelHeaders(HeaderSource.ENVIRONMENT, Path(env), _headers_release(Path(env)), running)
        raise KernelHeadersError(f"{ENV_KERNEL_SOURCE}={env} holds no kernel headers; unset it or {PACKAGE_HINT}")
    if KHEADERS_ARCHIVE.exists():
        return KernelHeaders(HeaderSource.KHEADERS, KHEADERS_ARCHIVE, running, running)
    pair = _newest_installed(usr_src)
    if pair is None:
        raise KernelHeadersError(f"no kernel headers for {running} and none installed; {PACKAGE_HINT}")
    tree, common = pair
    version = _headers_release(tree)
    warning = (f"no headers for the running kernel {running}; using the newest installed "
               f"({tree.name}); fine for bpfprof, which reads no kernel struct through them")
    if link:
        kdir.mkdir(parents=True, exist_ok=True)
        for name, target in (("build", tree), ("source", common)):
            p = kdir / name
            if p.is_symlink() or p.exists():
                continue
            p.symlink_to(target)
        return KernelHeaders(HeaderSource.NEWEST_INSTALLED, build, version, running, warning)
    raise KernelHeadersError(
        f"headers {tree} are installed but not linked for kernel {running}; "
        f"run `bpfprof doctor --fix` (links {build} and {kdir / 'source'})")
