"""`bpfprof diff BASE NEW`: which functions' share changed between two profiles, and is it more than noise."""

from __future__ import annotations

from pathlib import Path

import click

from exporters.diff import ALPHA, MIN_POINTS, function_values, rank_changes
from exporters.profile import Profile
from exporters.profile_files import read_one
from symbolizer.errors import ConfigError, ExportError


def _value_index(profile: Profile, path: Path, sample_type: str | None) -> int:
    wanted = sample_type or profile.default_sample_type or (profile.sample_types[-1].type
                                                             if profile.sample_types else "")
    for i, t in enumerate(profile.sample_types):
        if t.type == wanted:
            return i
    have = ", ".join(t.type for t in profile.sample_types) or "none"
    raise ExportError(f"{path} has no sample type {wanted!r} (it has: {have})")


def _load(path: Path, kind: str) -> Profile:
    p = read_one(path, kind)
    if not p.samples or not any(any(s.values) for s in p.samples):
        raise ExportError(f"{path}: the profile is empty (no samples)")
    return p


@click.command()
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "kind", default="", metavar="KIND", help="Profile type to take from files holding several.")
@click.option("--sample-type", default=None, metavar="NAME",
              help="Sample type to compare (cpu, samples, inuse_space...). Default: the profiles' default.")
@click.option("-n", "--top", "top_n", type=click.IntRange(min=1), default=15, show_default=True,
              help="Rows per table.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=ALPHA,
              show_default=True, help="Family-wise error rate of the test (Holm's correction).")
@click.option("--min-change", type=click.FloatRange(min=0), default=MIN_POINTS, show_default=True,
              help="Smallest change (points) called significant.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a differential flame graph page here.")
def diff(base: Path, new: Path, kind: str, sample_type: str | None, top_n: int, alpha: float, min_change: float,
         html_out: Path | None) -> None:
    """Functions whose share changed most from BASE to NEW (pprof or OTLP files of the same sample type).

    \b
    Shares are of each profile's total, self (leaf) and total (on the
    stack), changes in percentage points. `*` marks a change that is
    significant: a two-proportion z-test on the sample counts, Holm-corrected
    over every function tested, and at least --min-change points.
    """
    b, n = _load(base, kind), _load(new, kind)
    if b.kind and n.kind and b.kind != n.kind:
        raise ExportError(f"{base} is a {b.kind} profile and {new} a {n.kind} profile: compare the same type")
    bi = _value_index(b, base, sample_type)
    ni = _value_index(n, new, b.sample_types[bi].type)
    if b.sample_types[bi] != n.sample_types[ni]:
        raise ExportError(f"{base} and {new} measure {b.sample_types[bi].type} in different units "
                          f"({b.sample_types[bi].unit} vs {n.sample_types[ni].unit})")
    if html_out is not None and (html_out.is_dir() or not (html_out.parent if str(html_out.parent) else
                                                           Path(".")).is_dir()):
        raise ConfigError(f"cannot write {html_out}: not a file in an existing directory")
    bv, nv = function_values(b, bi), function_values(n, ni)
    changes = rank_changes(bv, nv, alpha=alpha, min_points=min_change)
    st = b.sample_types[bi]
    tested = bv.count_total > 0 and nv.count_total > 0
    click.echo(f"{st.type} ({st.unit}): base {base} ({bv.count_total:,} samples), new {new} "
               f"({nv.count_total:,} samples)")
    if not tested:
        click.echo("no count sample type: changes are ranked, not tested")
    for measure in ("self", "total"):
        rows = [c for c in changes if c.measure == measure][:top_n]
        click.echo(f"\n{measure}: {'base%':>7} {'new%':>7} {'change':>8} {'p(adj)':>9}  function")
        for c in rows:
            p = "-" if c.p_adjusted is None else f"{c.p_adjusted:.2g}"
            mark = "*" if c.significant else " "
            click.echo(f"{'':6}{100 * c.base_share:7.2f} {100 * c.new_share:7.2f} {c.points:+8.2f} {p:>9} "
                       f"{mark}{c.function}")
    significant = [c for c in changes if c.significant]
    click.echo(f"\n{len(significant)} significant change(s) (alpha {alpha:g}, Holm, >= {min_change:g} points)")
    if html_out is not None:
        from viewer.report import diff_data, render_report  # noqa: PLC0415  (the viewer: only with --html)

        facts = [("base", str(base)), ("new", str(new)), ("sample type", f"{st.type} ({st.unit})"),
                 ("base samples", f"{bv.count_total:,}"), ("new samples", f"{nv.count_total:,}"),
                 ("significant changes", str(len(significant)))]
        page = render_report(diff_data(b, n, ni, f"bpfprof diff: {base.name} -> {new.name}", facts))
        try:
            html_out.write_bytes(page)
        except OSError as e:
            raise ConfigError(f"cannot write {html_out}: {e.strerror}") from None
        click.echo(f"wrote {html_out}")
