"""`moeprof replay` against a local stand-in for an OpenAI server (the real vLLM server: test_vllm_serve.py).

The stand-in answers like vLLM's /v1/completions and /v1/chat/completions (usage counts, ids built
from X-Request-Id) and records what it received, so the tests check what replay sends: one request
per workload line on the right endpoint, the domain tag, the concurrency cap, and the files it writes.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from moeprof.capture.replay import arrival_times
from moeprof.capture.tags import parse_tag


class _Server:
    def __init__(self, delay: float = 0.0, fail_domain: str | None = None) -> None:
        self.received: list[tuple[str, dict, dict]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _json(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._json(200, {"object": "list", "data": [{"id": "tiny-moe", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.received.append((self.path, dict(self.headers), body))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay)
                with outer.lock:
                    outer.in_flight -= 1
                tag = self.headers.get("X-Request-Id", "none")
                if fail_domain and parse_tag(tag).domain == fail_domain:
                    return self._json(400, {"error": {"message": "prompt too long", "code": 400}})
                self._json(200, {
                    "id": f"cmpl-{tag}",
                    "choices": [{"index": 0, "finish_reason": "length", "text": "x"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": body["max_tokens"], "total_tokens": 0},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "w.jsonl"
    lines = [
        {"domain": "code", "text": "def f():", "dataset": "HumanEval"},
        {"domain": "chat", "messages": [{"role": "user", "content": "hi"}]},
        {"domain": "math", "text": "1+1="},
        {"domain": "code", "text": "class A:"},
        {"domain": "news", "text": "Today"},
        {"domain": "chat", "messages": [{"role": "user", "content": "bye"}]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_replay_sends_every_line_tagged_with_its_domain(cli, workload, tmp_path):
    with _Server(delay=0.05) as server:
        log, domains = tmp_path / "log.jsonl", tmp_path / "domains.csv"
        res = cli("replay", workload, "--url", server.url, "--concurrency", "2", "--max-tokens", "5",
                  "--extra", '{"ignore_eos": true}', "--log", log, "--domains", domains)
    assert res.exit_code == 0, res.stderr
    assert "replayed 6 requests" in res.stdout and "chat 2, code 2, math 1, news 1" in res.stdout
    paths = sorted(p for p, _, _ in server.received)
    assert paths == ["/v1/chat/completions"] * 2 + ["/v1/completions"] * 4
    for path, headers, body in server.received:
        tag = parse_tag(headers["X-Request-Id"])
        assert body["model"] == "tiny-moe" and body["max_tokens"] == 5 and body["ignore_eos"] is True
        assert ("messages" in body) == (tag.domain == "chat")
    assert {parse_tag(h["X-Request-Id"]).index for _, h, _ in server.received} == set(range(6))
    assert server.max_in_flight == 2
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["domain"] for r in records] == ["code", "chat", "math", "code", "news", "chat"]
    assert records[0]["dataset"] == "HumanEval" and records[0]["completion_tokens"] == 5
    with open(domains) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["domain"] for r in rows] == [r["domain"] for r in records]
    assert all(r["request_id"].startswith("cmpl-moeprof~") for r in rows)


def test_failed_requests_are_reported_and_exit_nonzero(cli, workload):
    with _Server(fail_domain="math") as server:
        res = cli("replay", workload, "--url", server.url)
    assert res.exit_code == 1
    assert "5 of 6" in res.stdout
    assert "request 2 (math) failed: HTTP 400: prompt too long" in res.stderr


def test_unreachable_server_is_a_clear_error(cli, workload):
    res = cli("replay", workload, "--url", "http://127.0.0.1:9")
    assert res.exit_code == 2
    assert "cannot reach http://127.0.0.1:9/v1/models" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_options_are_clear_errors(cli, workload):
    assert "--extra must be a JSON object" in cli("replay", workload, "--extra", "[1]").stderr
    assert "--concurrency must be at least 1" in cli("replay", workload, "--concurrency", "0").stderr
    res = cli("replay", workload.with_name("nope.jsonl"))
    assert res.exit_code == 2 and "no such prompts file" in res.stderr


def test_rate_gives_seeded_poisson_arrivals():
    t = arrival_times(2000, rate=4.0, seed=1)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(np.diff(t).mean() - 0.25) < 0.02  # mean gap 1/rate
    np.testing.assert_array_equal(t, arrival_times(2000, rate=4.0, seed=1))
    assert not arrival_times(3, None).any()
