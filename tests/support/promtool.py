"""promtool (Debian's `prometheus` package, installed by deploy/bootstrap.sh): lint scrapes and alert rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run deploy/bootstrap.sh (it installs Debian's prometheus package)"
    return path


def check_metrics(text: str) -> str:
    """Run `promtool check metrics` on a scrape; return its complaints (empty when clean)."""
    done = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)
    return (done.stdout + done.stderr).strip() if done.returncode != 0 or done.stdout.strip() else ""


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0.0 when the scrape does not have it: a counter never incremented)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def family_names(text: str) -> set[str]:
    """The names of every sample of a scrape (`_bucket`, `_count`, `_sum`, `_total` included)."""
    return {name for name, _labels in samples(text)}
