"""Reading py-spy's raw (collapsed) stacks: hot spots by own time and by inclusive time, time
by library, and a flame graph as SVG (no external tool needed)."""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

CATEGORIES = (  # (name, substrings of the file path), first match wins
    ("sqlalchemy", ("sqlalchemy/",)),
    ("asyncmy (MySQL driver)", ("asyncmy/",)),
    ("aio-pika / aiormq / pamqp (AMQP)", ("aio_pika/", "aiormq/", "pamqp/")),
    ("aiohttp / yarl / multidict (HTTP)", ("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/")),
    ("cs (CloudStack client, signing)", ("/cs/",)),
    ("pydantic (models, JSON)", ("pydantic/", "pydantic_core/")),
    ("transitions (state machine)", ("transitions/",)),
    ("tenacity (retries)", ("tenacity/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("logging + failover/logs.py", ("logging/", "failover/logs.py")),
    ("json", ("json/",)),
    ("asyncio (event loop)", ("asyncio/", "selectors.py")),
    ("uuid / datetime / other stdlib", ("uuid.py", "datetime", "python3.11/")),
    ("the service's own code", ("statemachine/", "adapters/", "consumers/", "publishers/", "failover/", "schemas/")),
)


# Named places, by inclusive time (a sample counts once per place even if several frames match).
SPOTS: tuple[tuple[str, Any], ...] = (
    ("JobStore.commit (a job's lease-fenced transactions)", lambda f, file: f == "JobStore.commit"),
    ("  of which JobContext.record (ledger writes)", lambda f, file: f == "JobContext.record"),
    ("Projections.apply (the projector's SQL)", lambda f, file: f == "Projections.apply"),
    ("Projector, whole (parse, apply, ack)", lambda f, file: f.startswith("Projector.")),
    ("CommandRecorder (command -> job + JobAccepted)", lambda f, file: f.startswith("CommandRecorder.")),
    ("OutboxRelay (publish + mark sent)", lambda f, file: f.startswith("OutboxRelay.")),
    ("OutboxStore (unsent, mark_sent, leadership)", lambda f, file: f.startswith("OutboxStore.")),
    ("PlatformTables (validation reads)", lambda f, file: f.startswith("PlatformTables.")),
    ("JobStore ledger/load/claim/renew", lambda f, file: f in ("JobStore.ledger", "JobStore.load", "JobStore.claim",
                                                               "JobStore.renew")),
    ("SQLAlchemy pool pre-ping (a round trip per checkout)", lambda f, file: "_do_ping" in f),
    ("SQLAlchemy statement compile / cache key", lambda f, file: "sqlalchemy/sql/" in file),
    ("CloudStackAdapter._call (HTTP, signing)", lambda f, file: f == "CloudStackAdapter._call"),
    ("VolumeDaemonAdapter._request (HTTP)", lambda f, file: f == "VolumeDaemonAdapter._request"),
    ("logging (process log lines)", lambda f, file: "logging/" in file or "failover/logs.py" in file),
    ("pydantic (events: build, dump, parse)", lambda f, file: "pydantic" in file),
    ("prometheus_client", lambda f, file: "prometheus_client/" in file),
    ("aio-pika / aiormq / pamqp (AMQP)", lambda f, file: any(x in file for x in ("aio_pika/", "aiormq/", "pamqp/"))),
    ("aiohttp (HTTP client)", lambda f, file: "aiohttp/" in file),
    ("start-up imports", lambda f, file: f == "_find_and_load"),
)


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """[(frames root->leaf as (func, file)), count]."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw)
            frames.append((m.group("func"), m.group("file")) if m else (raw, ""))
        out.append((frames, int(count)))
    return out


def short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def category(file: str) -> str:
    for name, parts in CATEGORIES:
        if any(p in file for p in parts):
            return name
    return "other"


def analyse(path: Path, top: int = 25) -> dict[str, Any]:
    stacks = parse(path)
    total = sum(c for _, c in stacks)
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    project_incl: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        func, file = frames[-1]
        own[f"{func} ({short(file)})"] += count
        cats[category(file)] += count
        seen: set[str] = set()
        for func, file in frames:
            key = f"{func} ({short(file)})"
            if key not in seen:
                seen.add(key)
                incl[key] += count
                if category(file) == "the service's own code":
                    project_incl[key] += count

    spots: Counter[str] = Counter()
    sql_writes = 0
    for frames, count in stacks:
        for label, match in SPOTS:
            if any(match(f, file) for f, file in frames):
                spots[label] += count
        if frames and frames[-1][0].endswith(".write") and "selector_events" in frames[-1][1]:
            caller = next((file for f, file in reversed(frames[:-1]) if "asyncio" not in file), "")
            if "sqlalchemy/" in caller:
                sql_writes += count

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "spots_inclusive": [(label, pct(spots[label])) for label, _ in SPOTS],
        "sql_socket_writes_own": pct(sql_writes),
        "sqlalchemy_own": pct(cats["sqlalchemy"]),
        "by_library_own_time": [(k, pct(v)) for k, v in cats.most_common()],
        "top_own_time": [(k, pct(v)) for k, v in own.most_common(top)],
        "top_inclusive": [(k, pct(v)) for k, v in incl.most_common(top)],
        "top_inclusive_service_code": [(k, pct(v)) for k, v in project_incl.most_common(top)],
    }


def to_markdown(a: dict[str, Any]) -> str:
    lines = [f"Samples: {a['samples']} (py-spy, 100 Hz, idle excluded)", "",
             "### Named places (inclusive: the share of samples with that place on the stack)", "",
             "| % of CPU samples | place |", "|---:|---|"]
    lines += [f"| {p} | {k} |" for k, p in a["spots_inclusive"]]
    lines += ["", f"SQL statements' socket writes (asyncmy, leaf `_SelectorSocketTransport.write` under "
                  f"SQLAlchemy): {a['sql_socket_writes_own']}% own time; SQLAlchemy's own Python: "
                  f"{a['sqlalchemy_own']}% own time.", ""]
    for title, key in (("Own time by library (leaf frame's file)", "by_library_own_time"),
                       ("Top functions by own time", "top_own_time"),
                       ("Top service functions by inclusive time", "top_inclusive_service_code")):
        lines += [f"### {title}", "", "| % of CPU samples | where |", "|---:|---|"]
        lines += [f"| {p} | `{k.replace('|', '/')}` |" for k, p in a[key]]
        lines.append("")
    return "\n".join(lines)


def flamegraph_svg(path: Path, out: Path, width: int = 1600, row: int = 16) -> None:
    """A plain flame graph (root at the bottom) of the collapsed stacks."""
    stacks = parse(path)
    tree: dict[str, Any] = {"n": 0, "k": {}}
    for frames, count in stacks:
        node = tree
        node["n"] += count
        for func, file in frames:
            key = f"{func} ({short(file)})"
            node = node["k"].setdefault(key, {"n": 0, "k": {}})
            node["n"] += count
    total = tree["n"] or 1

    def depth(n: dict[str, Any]) -> int:
        return 1 + max((depth(c) for c in n["k"].values()), default=0)

    levels = depth(tree)
    height = levels * row + 40
    rects: list[str] = []

    def draw(node: dict[str, Any], name: str, x: float, level: int) -> None:
        w = width * node["n"] / total
        if w < 0.3:
            return
        y = height - (level + 1) * row - 10
        hue = 10 + (hash(name) % 40)
        label = html.escape(name)
        pct = 100 * node["n"] / total
        text = html.escape(name[: int(w / 7)]) if w > 30 else ""
        rects.append(f'<g><title>{label} ({node["n"]} samples, {pct:.1f}%)</title>'
                     f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},85%,60%)"/>'
                     f'<text x="{x + 2:.1f}" y="{y + row - 4}" font-size="11">{text}</text></g>')
        cx = x
        for child_name, child in sorted(node["k"].items()):
            draw(child, child_name, cx, level + 1)
            cx += width * child["n"] / total

    draw(tree, "all", 0.0, 0)
    out.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace">'
        f'<rect width="100%" height="100%" fill="#fff"/><text x="10" y="16">serve under py-spy: '
        f'{total} samples (hover for names)</text>' + "".join(rects) + "</svg>")
