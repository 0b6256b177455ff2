"""Shared pieces of the benchmark scripts: machine facts, medians and markdown sections."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


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


def lmforge_cli(*args: str, cwd: Path) -> None:
    """Run one `lmforge` command in a subprocess (fails loudly, output captured)."""
    subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, check=True,
                   capture_output=True, text=True)


def base_run(root: Path, model: list[str]) -> None:
    """A pydoc-topics corpus, a 512-token tokenizer and a one-step base run ``root/base``: the
    starting point of the fine-tuning memory benchmarks."""
    from lmforge.data.corpora import pydoc_topics_text

    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in sorted(pydoc_topics_text().items())[:60]:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    lmforge_cli("data", "prepare", "corpus", "--out", "prepared", "--vocab_size", "512", cwd=root)
    lmforge_cli("pretrain", "--data", "prepared", "--run", "base", *model, "--train.max_steps",
                "1", "--train.batch_size", "1", "--train.eval_tokens", "256", "--sample_tokens",
                "0", "--train.threads", "2", "--overwrite", cwd=root)
