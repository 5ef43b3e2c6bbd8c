"""A fake OpenAI-compatible upstream for the client and sidecar tests, and process helpers.

``POST /v1/chat/completions`` answers ``"Answer #<n>: <last user message>"`` (``n`` counts every
call, so a test can tell a replayed answer from a fresh one), streaming or not, and counts
calls per last user message. Markers in the last user message change its behaviour:

- ``#fail500`` / ``#fail400`` / ``#fail429``: that HTTP error with an OpenAI-style error body;
- ``#truncate``: ``finish_reason == "length"``;
- ``#tool``: a tool call instead of text (``finish_reason == "tool_calls"``);
- ``#abort``: a stream that breaks off after two chunks (the connection is cut);
- ``#garbage``: a 200 response whose body is not JSON;
- ``#delay=<seconds>``: wait that long first (the sidecar's timeout tests);
- ``#trickle=<seconds>``: answer for that long one byte at a time, a byte every 0.25 s (JSON
  whitespace, or SSE comment lines in a stream), then the answer: no single read ever waits
  long, so only a total deadline can cut it short.

With an ``openai-project`` header the answer also names it and when it was made,
``"Answer #<n> [project=<p>] (at <unix time>): <message>"`` (evals/soak.py checks served answers
against what was asked, by whom and when). Run as a process, the environment can make it
realistic: ``SEMCACHE_FAKE_LATENCY=0.2-0.8`` waits a uniform random time in that range before
each answer, ``SEMCACHE_FAKE_FAIL_RATE=0.02`` answers that share of calls with a 500.

``GET /_stats`` returns ``{"total": n, "calls": {prompt: n}, "auth": [...], "last_body": {...}}``;
``POST /_reset`` clears it. Run it as a process: ``python tests/fake_upstream.py --port 8001``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

app = FastAPI(title="fake OpenAI upstream")
_LATENCY = tuple(float(x) for x in os.environ.get("SEMCACHE_FAKE_LATENCY", "0-0").split("-"))
_FAIL_RATE = float(os.environ.get("SEMCACHE_FAKE_FAIL_RATE", "0"))
_RANDOM = random.Random(int(os.environ.get("SEMCACHE_FAKE_SEED", "0")))
STATE: dict[str, Any] = {"total": 0, "calls": Counter(), "auth": [], "last_body": None}
_DELAY = re.compile(r"#delay=([0-9.]+)")
_TRICKLE = re.compile(r"#trickle=([0-9.]+)")
TRICKLE_EVERY = 0.25


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _error(status: int, message: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/_stats")
async def stats() -> dict[str, Any]:
    return {
        "total": STATE["total"],
        "calls": dict(STATE["calls"]),
        "auth": STATE["auth"][-20:],
        "last_body": STATE["last_body"],
    }


@app.post("/_reset")
async def reset() -> dict[str, str]:
    STATE.update(total=0, calls=Counter(), auth=[], last_body=None)
    return {"status": "reset"}


@app.post("/v1/chat/completions", response_model=None)
async def chat(request: Request) -> Any:
    body = await request.json()
    prompt = _last_user_text(body)
    STATE["total"] += 1
    STATE["calls"][prompt] += 1
    STATE["auth"].append(request.headers.get("authorization"))
    STATE["last_body"] = body
    n = STATE["total"]
    if match := _DELAY.search(prompt):
        await asyncio.sleep(float(match.group(1)))
    if _LATENCY[1] > 0:
        await asyncio.sleep(_RANDOM.uniform(*_LATENCY))
    if _FAIL_RATE and _RANDOM.random() < _FAIL_RATE:
        return _error(500, "fake upstream failure (random)")
    for status in (500, 400, 429):
        if f"#fail{status}" in prompt:
            return _error(status, f"fake upstream failure {status}")
    if "#garbage" in prompt:
        return PlainTextResponse("this is not json", 200)
    trickle = _TRICKLE.search(prompt)

    model = body.get("model", "fake-model")
    project = request.headers.get("openai-project")
    stamp = f" [project={project}] (at {time.time():.3f})" if project else ""
    answer = f"Answer #{n}{stamp}: {prompt}"
    finish = "length" if "#truncate" in prompt else "stop"
    tool = "#tool" in prompt
    usage = {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": len(answer.split()),
        "total_tokens": len(prompt.split()) + len(answer.split()),
    }
    created = int(time.time())
    cid = f"chatcmpl-fake{n}"
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _trickled(
                float(trickle.group(1)) if trickle else 0.0,
                b": still thinking\n\n",
                _stream(
                    cid,
                    created,
                    model,
                    answer,
                    finish,
                    tool,
                    "#abort" in prompt,
                    usage if include_usage else None,
                ),
            ),
            media_type="text/event-stream",
        )
    message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None}
    if tool:
        message = {"role": "assistant", "content": None, "tool_calls": [_TOOL_CALL]}
        finish = "tool_calls"
    completion = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
        "system_fingerprint": "fp_fake",
    }
    if trickle:
        return StreamingResponse(
            _trickled(float(trickle.group(1)), b" ", _once(json.dumps(completion).encode())),
            media_type="application/json",
        )
    return completion


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _trickled(
    seconds: float, filler: bytes, then: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """``filler`` every TRICKLE_EVERY seconds for ``seconds``, then the chunks of ``then``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield filler
        await asyncio.sleep(TRICKLE_EVERY)
    async for chunk in then:
        yield chunk


_TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"q": "x"}'},
}


async def _stream(
    cid: str,
    created: int,
    model: str,
    answer: str,
    finish: str,
    tool: bool,
    abort: bool,
    usage: dict[str, int] | None,
) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n".encode()

    yield event(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    )
    if tool:
        call = {"index": 0, **_TOOL_CALL}
        yield event([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}])
        finish = "tool_calls"
    else:
        for i, word in enumerate(answer.split(" ")):
            piece = word if i == 0 else f" {word}"
            yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            await asyncio.sleep(0)
            if abort and i == 1:
                raise RuntimeError("fake upstream aborts the stream")
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


# -- process helpers (used by the tests and evals/bench_server.py) ---------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_of(proc: subprocess.Popen[bytes]) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace")[-4000:] if path else ""


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a process whose output goes to a log file (a pipe nobody reads could block it)."""
    with tempfile.NamedTemporaryFile(prefix="semcache-proc-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{_log_of(proc)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{_log_of(proc)}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process started here, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    path = getattr(proc, "log_path", None)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def start_upstream(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Run this fake upstream as a process (``env``: e.g. ``SEMCACHE_FAKE_LATENCY``); returns
    (process, base URL ending in /v1)."""
    port = free_port()
    proc = _spawn([PYTHON, str(Path(__file__).resolve()), "--port", str(port)], _env(env))
    wait_ready(f"http://127.0.0.1:{port}/healthz", proc, timeout=30)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_sidecar(
    data: Path, upstream: str | None, env: dict[str, str] | None = None, *args: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``semcache serve`` as a process; returns (process, base URL ending in /v1)."""
    port = free_port()
    cmd = [PYTHON, "-m", "semcache.server", "--data", str(data), "--port", str(port), *args]
    if upstream:
        cmd += ["--upstream", upstream]
    proc = _spawn(cmd, _env(env))
    wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    proc, url = start_upstream()
    try:
        yield url
    finally:
        stop(proc)


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    ns = parser.parse_args()
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning", access_log=False)
