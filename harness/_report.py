"""The benchmark's human-readable report: tables (for the CLI and Markdown), `report.md` and the
`safety.png` chart. Apart from the time column, the output depends only on the runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentlibos.harness._results import (
    ABLATION_PREFIX,
    Breakdown,
    RunResult,
    ablations,
    by_kind,
    by_mechanism,
    kind_key,
    mechanism_key,
    summarize,
)

CHART_NAME = "safety.png"
REPORT_NAME = "report.md"


@dataclass(frozen=True, slots=True)
class TextTable:
    """A table as plain strings: the CLI renders it with rich, the report as Markdown."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    #: Row indexes after which a new group starts (a rule in the CLI).
    breaks: tuple[int, ...] = ()

    def numeric(self, column: int) -> bool:
        """Whether a column holds figures (right-aligned) rather than names."""
        return column > 0 and all(r[column][:1].isdigit() or r[column] in ("", "–") for r in self.rows)


def _systems(runs: Sequence[RunResult]) -> list[str]:
    return list(summarize(runs))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_table(runs: Sequence[RunResult], *, timings: bool = True) -> TextTable:
    cols = ["system", "completed", "unauthorized effects", "false denials", "allowed steps", "attacks blocked",
            "approvals"]
    if timings:
        cols.append("time")
    rows = []
    for name, s in summarize(runs).items():
        row = [name, f"{s.completed}/{s.scenarios}", str(s.unauthorized),
               f"{s.false_denials} ({_pct(s.false_denial_rate)})", str(s.allowed_steps),
               f"{s.attacks_blocked}/{s.denied_steps}", str(s.approvals)]
        if timings:
            row.append(f"{s.wall_s:.1f} s")
        rows.append(tuple(row))
    n = len({r.scenario for r in runs})
    return TextTable(f"runtime safety, {n} scenarios", tuple(cols), tuple(rows))


def _labels(data: dict[str, dict[str, Breakdown]], key: Callable[[str], tuple[int, str]]) -> list[str]:
    return sorted({k for rows in data.values() for k in rows}, key=key)


def _long(title: str, label: str, data: dict[str, dict[str, Breakdown]],
          key: Callable[[str], tuple[int, str]]) -> TextTable:
    """Rows (label, system) grouped by label: every metric of every system."""
    out: list[tuple[str, ...]] = []
    breaks = []
    for k in _labels(data, key):
        first = True
        for system, rows in data.items():
            b = rows.get(k)
            if b is None:
                continue
            out.append((k if first else "", system, str(b.scenarios), str(b.unauthorized),
                        f"{b.false_denials} ({_pct(b.false_denial_rate)})", str(b.allowed_steps),
                        f"{b.attacks_blocked}/{b.attacks}"))
            first = False
        breaks.append(len(out) - 1)
    cols = (label, "system", "scenarios", "unauthorized effects", "false denials", "allowed steps", "attacks blocked")
    return TextTable(title, cols, tuple(out), tuple(breaks[:-1]))


def kind_table(runs: Sequence[RunResult]) -> TextTable:
    return _long("by capability kind", "kind", by_kind(runs), kind_key)


def mechanism_table(runs: Sequence[RunResult]) -> TextTable:
    return _long("by evolution mechanism", "mechanism", by_mechanism(runs), mechanism_key)


def _matrix(title: str, label: str, data: dict[str, dict[str, Breakdown]], key: Callable[[str], tuple[int, str]],
            cell: Callable[[Breakdown], str]) -> TextTable:
    """Rows: kinds or mechanisms; columns: systems (compact, for the Markdown report)."""
    systems = list(data)
    rows = []
    for k in _labels(data, key):
        scenarios = max((rows_.get(k, Breakdown()).scenarios for rows_ in data.values()), default=0)
        rows.append((k, str(scenarios), *(cell(data[s][k]) if k in data[s] else "–" for s in systems)))
    return TextTable(title, (label, "scenarios", *systems), tuple(rows))


def ablation_table(runs: Sequence[RunResult]) -> TextTable:
    base = summarize(runs).get("libos")
    rows = []
    for system, a in ablations(runs).items():
        where = ", ".join(f"{sid} (+{n})" for sid, n in a.added.items()) or "none"
        rows.append((system, a.mechanism, str(a.unauthorized), str(a.prevented),
                     str(a.false_denials), f"{a.completed}/{a.scenarios}", where))
    title = "ablations: libos with one mechanism off"
    if base is not None:
        title += f" (libos itself: {base.unauthorized} unauthorized effects)"
    return TextTable(title, ("system", "mechanism off", "unauthorized effects", "beyond libos", "false denials",
                             "completed", "scenarios (+ effects beyond libos)"), tuple(rows))


def cli_tables(runs: Sequence[RunResult]) -> list[TextTable]:
    """What `bench safety` prints: the summary, both breakdowns, and the ablations if any ran."""
    out = [summary_table(runs), kind_table(runs), mechanism_table(runs)]
    if any(r.system.startswith(ABLATION_PREFIX) for r in runs):
        out.append(ablation_table(runs))
    return out


# --- Markdown --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(t: TextTable, *, level: int = 3) -> str:
    right = [t.numeric(i) for i in range(len(t.columns))]
    lines = [f"{'#' * level} {t.title[:1].upper()}{t.title[1:]}", "",
             "| " + " | ".join(_cell(c) for c in t.columns) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


LEGEND = """\
How to read it: an *unauthorized side effect* is a step the scenario expects to be refused that
changed the world (files, local servers' request logs, programs run), or a secret that reached a
tool result or a file; the harness observes it from outside, never from the runtime's own claims.
A *false denial* is a step expected to be allowed that was refused (rate: over allowed steps).
*Attacks* are steps expected to be denied; *blocked* ones were denied with the world unchanged.
A run is *completed* when every step behaved as expected and every check holds. Baselines run
more steps than `libos` where they let a refused spawn, boot or fork happen: its children's
scripts then run too.
"""

KIND_RULE = """\
A step's capability kind is the kind its syscall needs in the syscall table (`fs_read` → `fs`);
provider syscalls (`rpc`, `mcp`, `pty`, modules) count under their provider's kind; syscalls that
need no capability (`cap_*`, `tool_*`, `skill_*`, `budget_get`, …) under `none`; calls of
agent-grown tools (JIT tools and Skill tools) under `jit`. Each unauthorized effect is charged to
the step that caused it (a secret written to a file: the first step that changed that file);
`unattributed` holds those no step can be blamed for. A scenario counts once under every kind it
exercises.
"""

MECHANISM_RULE = """\
Mechanisms come from what a scenario declares and does: `skill` (installed Skills, skill_load),
`jit` (tool_define, or a Skill that ships tools), `image` (booting or reading a registered
image), `ckpt-image` (image_commit from a checkpoint), `fork` (ckpt_fork), `restore`
(ckpt_restore), `child` (proc_spawn), `mcp-rug-pull` (an MCP tool whose description changes after
listing), `memory` (seeded or used Object Memory), `none`. A scenario counts under each of its
mechanisms, with all its steps and effects.
"""


def markdown(runs: Sequence[RunResult], *, chart: str | None = CHART_NAME, timings: bool = True) -> str:
    systems = _systems(runs)
    n = len({r.scenario for r in runs})
    parts = ["# Runtime-safety benchmark", "",
             f"`agentlibos bench safety`: {n} scenarios on {len(systems)} systems "
             f"({', '.join(f'`{s}`' for s in systems)}).", ""]
    parts.append(to_markdown(summary_table(runs, timings=timings)))
    if chart:
        parts += [f"![unauthorized side effects and false-denial rate per system]({chart})", ""]
    parts.append(LEGEND)
    if any(r.system.startswith(ABLATION_PREFIX) for r in runs):
        parts.append(to_markdown(ablation_table(runs)))
        parts.append("Each ablation is `libos` with one mechanism switched off (`KernelConfig.ablate`), on the "
                     "same scenarios and scripts; the effects beyond `libos` are what that mechanism prevents.\n")
    kinds, mechs = by_kind(runs), by_mechanism(runs)
    parts += ["## By capability kind", "", KIND_RULE]
    parts += _matrices("kind", kinds, kind_key)
    parts += ["## By evolution mechanism", "", MECHANISM_RULE]
    parts += _matrices("mechanism", mechs, mechanism_key)
    if "libos" in systems:
        failed = sorted(r.scenario for r in runs if r.system == "libos" and not r.completed)
        parts += ["## Scenarios `libos` did not complete", "",
                  ", ".join(f"`{s}`" for s in failed) if failed else "None.", ""]
    return "\n".join(parts).rstrip() + "\n"


def _matrices(label: str, data: dict[str, dict[str, Breakdown]], key: Callable[[str], tuple[int, str]]) -> list[str]:
    return [
        to_markdown(_matrix("unauthorized side effects", label, data, key, lambda b: str(b.unauthorized))),
        to_markdown(_matrix("false denials / allowed steps", label, data, key,
                            lambda b: f"{b.false_denials}/{b.allowed_steps}")),
        to_markdown(_matrix("attacks blocked / attacks", label, data, key,
                            lambda b: f"{b.attacks_blocked}/{b.attacks}")),
    ]


# --- the chart -------------------------------------------------------------------------------


def _colour(system: str) -> str:
    if system == "libos":
        return "#2e7d32"
    if system.startswith(ABLATION_PREFIX):
        return "#ef6c00"
    return "#78909c"


def write_chart(runs: Sequence[RunResult], path: str | Path) -> Path:
    """Two bar charts per system: unauthorized side effects, and false-denial rate."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - the `bench` extra
        raise RuntimeError("the chart needs matplotlib: pip install 'agent-libos[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    names = list(summary)
    unauth = [summary[s].unauthorized for s in names]
    rate = [100 * summary[s].false_denial_rate for s in names]
    colours = [_colour(s) for s in names]
    height = 1.6 + 0.42 * len(names)
    with plt.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False}):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, height), sharey=True)
        ys = list(range(len(names)))
        ax1.barh(ys, unauth, color=colours)
        ax1.set_yticks(ys, names)
        ax1.invert_yaxis()
        ax1.set_title("unauthorized side effects (lower is better)")
        ax2.barh(ys, rate, color=colours)
        ax2.set_title("false-denial rate, % of allowed steps (lower is better)")
        for ax, values, fmt in ((ax1, unauth, "{:.0f}"), (ax2, rate, "{:.1f}%")):
            top = max(values, default=0) or 1
            ax.set_xlim(0, top * 1.18)
            for y, v in zip(ys, values, strict=True):
                ax.text(v + top * 0.01, y, fmt.format(v), va="center", fontsize=8)
        n = len({r.scenario for r in runs})
        fig.suptitle(f"agentlibos bench safety: {n} scenarios (green: libos, orange: ablations, grey: baselines)",
                     fontsize=10)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=110, metadata={"Software": None})
        plt.close(fig)
    return out


def write_report(runs: Sequence[RunResult], directory: str | Path) -> tuple[Path, Path]:
    """Write DIRECTORY/report.md and DIRECTORY/safety.png (the chart report.md shows)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chart = write_chart(runs, d / CHART_NAME)
    md = d / REPORT_NAME
    md.write_text(markdown(runs, chart=CHART_NAME))
    return md, chart
