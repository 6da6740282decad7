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

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "by_library_own_time": [(k, pct(v)) for k, v in cats.most_common()],
        "top_own_time": [(k, pct(v)) for k, v in own.most_common(top)],
        "top_inclusive": [(k, pct(v)) for k, v in incl.most_common(top)],
        "top_inclusive_service_code": [(k, pct(v)) for k, v in project_incl.most_common(top)],
    }


def to_markdown(a: dict[str, Any]) -> str:
    lines = [f"Samples: {a['samples']} (py-spy, 100 Hz, idle excluded)", ""]
    for title, key in (("Own time by library (leaf frame's file)", "by_library_own_time"),
                       ("Top functions by own time", "top_own_time"),
                       ("Top service functions by inclusive time", "top_inclusive_service_code")):
        lines += [f"### {title}", "", "| % of CPU samples | where |", "|---:|---|"]
        lines += [f"| {p} | `{html.escape(k)}` |" for k, p in a[key]]
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
