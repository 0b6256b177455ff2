"""Shared pieces of the benchmark scripts: machine facts, medians and markdown sections."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from dataclasses import dataclass, field


@dataclass
class Section:
    """One table of RESULTS.md: a title, how it was measured, and its rows."""

    title: str
    method: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The section as markdown: heading, method paragraph, table, notes."""
        lines = [f"## {self.title}", "", self.method, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns)))
                     + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def median(values: list[float]) -> float:
    """The median, robust to the odd slow round on a shared machine."""
    return statistics.median(values)


def version(dist: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores, {ram:.0f} GiB RAM",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{d} {version(d)}" for d in (
            "lmforge", "torch", "transformers", "tokenizers", "numpy")),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages, for judging how shared the machine was."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n_bytes / 2**20:,.1f} MiB"
