"""Layers point one way: the domain modules in shared/ never import the wiring or the adapters at run time.

`runtime` builds every client (boto3, Celery, Redis, requests) and is handed to the plain functions; only the
adapters (`worker/`, `webhook/`), the CLI's commands and `runtime` itself may import it. Imports under
`if TYPE_CHECKING:` are for annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIRING = "kling_relay.shared.runtime"
ADAPTERS = ("kling_relay.worker", "kling_relay.webhook", "kling_relay.simulator", "kling_relay.shared.cli")
#: Modules allowed to wire things up.
WIRING_MODULES = {"runtime.py", "cli.py", "doctor.py"}


def runtime_imports(path: Path) -> list[str]:
    """Module names imported by `path` when it runs (top level and inside functions), TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def domain_modules() -> list[Path]:
    return sorted(p for p in SHARED.rglob("*.py") if p.name not in WIRING_MODULES)


@pytest.mark.parametrize("path", domain_modules(), ids=lambda p: str(p.relative_to(SHARED)))
def test_domain_modules_do_not_import_the_wiring_or_the_adapters(path: Path) -> None:
    bad = [n for n in runtime_imports(path) if n == WIRING or n.startswith(ADAPTERS)]
    assert not bad, f"{path.name} imports {bad}: hand the Runtime in, or move the code to an adapter"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from kling_relay.shared.runtime import R\n"
                      "def f():\n    from kling_relay.shared.runtime import make_s3_client\n")
    assert runtime_imports(module).count(WIRING) == 1  # the one in f(), not the annotation-only one


REPO = SHARED.parent


@pytest.mark.parametrize(("folder", "forbidden"), [("bench", "tests"), ("tests", "bench"), ("deploy", "tests"),
                                                   ("deploy", "bench")])
def test_bench_tests_and_deploy_do_not_import_each_other(folder: str, forbidden: str) -> None:
    """Issue 8 item 7: bench/copy_memory.py imported tests.support, and the memory test imported bench.copy_memory.
    What both need (local processes, the copy probe, moto's S3) lives in deploy/, which imports neither."""
    bad = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = [n for n in runtime_imports(path) if n == forbidden or n.startswith(forbidden + ".")]
        if names:
            bad[str(path.relative_to(REPO))] = names
    assert not bad, f"{folder}/ imports {forbidden}: {bad}"
