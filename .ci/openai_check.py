#!/usr/bin/env python3
"""Checks a running `tpi serve` with the official `openai` Python client.

    python3 .ci/openai_check.py [BASE_URL]

BASE_URL: argv[1], else $TPI_SERVE_URL, else $OPENAI_BASE_URL, else http://127.0.0.1:8080.
`/v1` is appended when missing. Waits up to $TPI_SERVE_WAIT seconds (default 120) for
/health, then runs one non-streaming and one streaming chat completion (greedy) and asserts
both return non-empty content. Exits non-zero on any failure.
"""

import json
import os
import sys
import time
import urllib.request


def base_url() -> str:
    url = (
        (sys.argv[1] if len(sys.argv) > 1 else None)
        or os.environ.get("TPI_SERVE_URL")
        or os.environ.get("OPENAI_BASE_URL")
        or "http://127.0.0.1:8080"
    )
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def wait_healthy(root: str, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(root + "/health", timeout=5) as r:
                return json.load(r)
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.5)
    raise SystemExit(f"openai_check: {root}/health not answering after {limit_s:.0f} s: {last}")


def main() -> int:
    try:
        import openai
    except ImportError:
        print("openai_check: the `openai` package is not installed (pip install openai)", file=sys.stderr)
        return 2

    url = base_url()
    health = wait_healthy(url[: -len("/v1")], float(os.environ.get("TPI_SERVE_WAIT", "120")))
    print(f"openai_check: {url} health: {health.get('status')} ({health.get('ranks')} ranks)")

    client = openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=300)
    models = [m.id for m in client.models.list()]
    assert models, "/v1/models lists no model"
    model = models[0]
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    text = r.choices[0].message.content or ""
    print(f"openai_check: non-streaming: {text!r} (finish {r.choices[0].finish_reason}, usage {r.usage})")
    assert text.strip(), "non-streaming chat completion returned no content"
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    assert r.usage and r.usage.completion_tokens > 0, r.usage

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta and c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(parts)
    print(f"openai_check: streaming: {streamed!r} ({len(parts)} chunks, finish {finish}, usage {usage})")
    assert streamed.strip(), "streaming chat completion returned no content"
    assert finish in ("stop", "length"), f"no finish_reason in the stream: {finish}"
    if streamed != text:
        print("openai_check: note: streamed text differs from the non-streamed one", file=sys.stderr)

    print("openai_check: OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"openai_check: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        print(f"openai_check: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
