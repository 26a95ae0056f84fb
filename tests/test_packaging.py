"""The wheel claims one top-level name, `kling_relay`: built, installed into a fresh venv, imported from elsewhere.

The fresh venv sees the project venv's third-party packages through a `.pth` line (so nothing is downloaded),
but not the repository, and not the editable install's import hook: what it imports of kling-relay comes from
the wheel alone.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.procs import Process, RedisServer
from tests.support.settings_env import relay_env
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
BARE_NAMES = ("shared", "worker", "webhook", "simulator")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")
    # --no-isolation: build with the setuptools of the project venv (no download); a copy of the tree keeps the
    # repository free of build/ and *.egg-info.
    subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "-o", str(build / "src.tar"), "HEAD"],
                   check=True)
    src = build / "src"
    src.mkdir()
    subprocess.run(["tar", "-xf", str(build / "src.tar"), "-C", str(src)], check=True)
    # the working tree's pyproject.toml and package folders, so uncommitted edits are what gets tested
    for name in ("pyproject.toml", "README.md", *BARE_NAMES):
        subprocess.run(["rm", "-rf", str(src / name)], check=True)
        subprocess.run(["cp", "-r", str(REPO_ROOT / name), str(src / name)], check=True)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (found,) = out.glob("kling_relay-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Third-party packages from the project venv, as plain paths: its .pth files (the editable hook) are not run.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "-q", str(wheel)], check=True, timeout=300)
    return python


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        names = zf.namelist()
    assert tops == {"kling_relay", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "kling_relay/shared/jobs.py" in names and "kling_relay/worker/celery_app.py" in names
    assert "kling_relay/shared/pipeline/submit.py" in names  # subpackages are listed in pyproject too
    assert "kling_relay/shared/py.typed" in names
    # the dashboard's templates and static files (package-data)
    assert "kling_relay/webhook/templates/dashboard/overview.html" in names
    assert "kling_relay/webhook/static/dashboard.js" in names


def test_installed_wheel_imports_only_under_kling_relay(fresh_python: Path, tmp_path: Path) -> None:
    probe = ("import importlib, sys\n"
             "import kling_relay.shared.jobs, kling_relay.webhook.app, kling_relay.worker.tasks\n"
             "import kling_relay.simulator\n"
             "assert 'site-packages' in kling_relay.shared.jobs.__file__, kling_relay.shared.jobs.__file__\n"
             f"for name in {BARE_NAMES!r}:\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except ModuleNotFoundError:\n"
             "        continue\n"
             "    sys.exit(f'{name} is importable')\n"
             "print('ok')\n")
    out = subprocess.run([str(fresh_python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    script = fresh_python.parent / "kling-relay"
    usage = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "simulate" in usage.stdout, usage.stderr


def test_celery_worker_starts_from_the_wheel(fresh_python: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    env = {**relay_env(REDIS_URL=redis_server.url, S3_BUCKET="bucket"), "PYTHONPATH": ""}
    worker = Process("wheel-worker", [str(fresh_python), "-m", "celery", "-A", "kling_relay.worker.celery_app",
                                      "worker", "--pool", "solo", "--queues", "submit", "--loglevel", "INFO"],
                     log_dir=tmp_path, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: not worker.alive() or "ready" in worker.log_tail(200), timeout=60,
                   what="the worker ready (or exited)", diagnostics=lambda: worker.log_tail(200), interval=0.2)
        log = worker.log_tail(200)
        assert worker.alive() and "ready" in log, log
        assert "kling_relay.submit_job" in log  # the tasks were registered under the installed package
    finally:
        worker.stop()
