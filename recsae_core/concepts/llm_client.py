"""A small client for any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp server, hosted APIs).

- URL, model and key come from options or from RECSAE_LLM_URL / RECSAE_LLM_MODEL / RECSAE_LLM_API_KEY.
- Calls run on a thread pool of `concurrency` workers, are retried with exponential back-off on transport errors,
  timeouts, 429 and 5xx, and fail at once, with the server's message, on other 4xx answers.
- Every answer is cached on disk under sha256(model + request): a rerun costs nothing and a half-finished run
  resumes where it stopped. Entries are written atomically, so clients in several processes or machines (Ray
  workers) can share one cache folder, each answering from the others' entries.
- `cache_only` answers from the cache alone and never contacts the endpoint (to look at a long run before it ends):
  a missing answer raises `LLMCacheMiss`.
- `yes_probability` asks for the first token's top log-probabilities and returns P(Yes) / (P(Yes) + P(No)):
  small models give useless 0-10 numbers but usable yes/no probabilities.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

import httpx
from tqdm.auto import tqdm

from recsae_core.common.artifacts import write_json
from recsae_core.common.errors import RecsaeError

ENV_URL, ENV_MODEL, ENV_KEY = "RECSAE_LLM_URL", "RECSAE_LLM_MODEL", "RECSAE_LLM_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
T = TypeVar("T")
R = TypeVar("R")


class LLMError(RecsaeError):
    """The language model endpoint is unreachable, misconfigured, or answered something unusable."""


class LLMCacheMiss(LLMError):
    """A cache-only client was asked something its cache does not hold."""


@dataclass
class LLMOptions:
    """Where and how to call the language model; None fields fall back to the environment."""

    url: str | None = None
    """Base URL of the OpenAI-compatible API ('http://127.0.0.1:8080/v1'); '/v1' is added to a bare host."""
    model: str | None = None
    """Model name; None takes the endpoint's first listed model."""
    api_key: str | None = None
    """Bearer token, if the endpoint needs one."""
    concurrency: int = 4
    """Requests in flight at once (1 suits a local llama.cpp server, which reuses the previous prompt's prefix)."""
    timeout: float = 120.0
    """Seconds per request."""
    retries: int = 4
    """Retries after the first try, on transient errors only."""
    backoff: float = 0.5
    """First back-off delay in seconds; doubled on every retry, with jitter."""
    cache_dir: Path | None = None
    """Folder of cached answers; None disables the cache."""
    cache_only: bool = False
    """Answer from the cache alone, never contacting the endpoint (the URL is then optional)."""

    def resolved(self) -> LLMOptions:
        url = self.url or os.environ.get(ENV_URL)
        if self.cache_only:
            if self.cache_dir is None:
                raise LLMError("a cache-only language model client needs a cache folder")
            return replace(self, url=url, model=self.model or os.environ.get(ENV_MODEL) or None)
        if not url:
            raise LLMError(f"no language model endpoint: pass --llm-url URL or set {ENV_URL}")
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise LLMError(f"language model URL {url!r} is not an http(s) URL")
        base = parsed.geturl().rstrip("/")
        if parsed.path in ("", "/"):
            base += "/v1"
        if self.concurrency < 1 or self.retries < 0 or self.timeout <= 0:
            raise LLMError("LLM concurrency must be >= 1, retries >= 0 and timeout > 0")
        return LLMOptions(
            url=base, model=self.model or os.environ.get(ENV_MODEL) or None,
            api_key=self.api_key or os.environ.get(ENV_KEY) or None, concurrency=self.concurrency,
            timeout=self.timeout, retries=self.retries, backoff=self.backoff, cache_dir=self.cache_dir,
        )  # fmt: skip


class Completion(NamedTuple):
    """One chat completion."""

    text: str
    """The message content."""
    prompt_tokens: int
    """Prompt tokens as the server counted them (0 if it did not say)."""
    completion_tokens: int
    """Generated tokens."""
    cached: bool
    """True when answered from the on-disk cache."""


class YesProbability(NamedTuple):
    """The model's answer to a yes/no question, as a probability."""

    p_yes: float
    """P(Yes) / (P(Yes) + P(No)) over the first token's top log-probabilities."""
    prompt_tokens: int
    """Prompt tokens."""
    cached: bool
    """True when answered from the on-disk cache."""


@dataclass
class Usage:
    """Calls and tokens of one client's lifetime."""

    calls: int = 0
    """Requests answered (from the server or the cache)."""
    cached: int = 0
    """Of those, answered from the cache."""
    prompt_tokens: int = 0
    """Prompt tokens over all answers (cached ones included, as recorded when first answered)."""
    completion_tokens: int = 0
    """Generated tokens over all answers."""
    server_seconds: float = 0.0
    """Time spent waiting for the server in this client's lifetime (summed over threads)."""
    answer_seconds: float = 0.0
    """What the answers cost when first fetched, cached ones included (a run resumed over days reports its whole
    cost), summed over the `answers_timed` answers whose cache entry recorded it."""
    answers_timed: int = 0
    """Answers with a recorded fetch time."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, float | int]:
        counts = ("calls", "cached", "prompt_tokens", "completion_tokens", "answers_timed")
        return {k: getattr(self, k) for k in counts} | {
            "server_seconds": round(self.server_seconds, 2), "answer_seconds": round(self.answer_seconds, 2)
        }  # fmt: skip

    def add(self, other: Usage) -> None:
        """Count another client's usage in this one's (a Ray worker's, on the driver)."""
        with self.lock:
            for name in USAGE_COUNTS:
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def __getstate__(self) -> dict[str, Any]:  # a lock does not pickle, and Ray workers send their usage back
        return {name: getattr(self, name) for name in USAGE_COUNTS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def timed(self, seconds: float | None) -> None:
        if isinstance(seconds, int | float) and seconds >= 0:
            with self.lock:
                self.answer_seconds += float(seconds)
                self.answers_timed += 1


USAGE_COUNTS = tuple(f.name for f in fields(Usage) if f.name != "lock")


class LLMClient:
    """Chat completions and yes/no probabilities against one endpoint and model."""

    def __init__(self, options: LLMOptions) -> None:
        self.options = options.resolved()
        headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
        self.http = httpx.Client(base_url=self.options.url or "", headers=headers, timeout=self.options.timeout)
        self.usage = Usage()
        self.model = self.options.model or ""

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoint

    def check(self) -> str:
        """Make sure the endpoint answers and pick the model; returns the model name. A cache-only client takes the
        model from the cache when none is given."""
        if self.options.cache_only:
            if not self.model:
                self.model = self._cached_model()
            return self.model
        url = self.options.url
        try:
            response = self.http.get("/models")
        except httpx.HTTPError as err:
            raise LLMError(
                f"cannot reach the language model at {url} ({type(err).__name__}: {err}); start an OpenAI-compatible "
                f"server (e.g. python scripts/llm_server.py --model FILE.gguf) or fix --llm-url / {ENV_URL}"
            ) from None
        if response.status_code in (401, 403):
            raise LLMError(f"{url}/models: the endpoint refused the API key (HTTP {response.status_code}); "
                           f"set --llm-api-key or {ENV_KEY}")  # fmt: skip
        listed: list[str] = []
        if response.status_code == 200:
            try:
                listed = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
            except (ValueError, AttributeError, TypeError):
                raise LLMError(f"{url}/models: not an OpenAI-compatible answer: {response.text[:200]!r}") from None
        elif response.status_code != 404:  # some servers do not list models; a 404 here is fine
            raise LLMError(f"{url}/models: HTTP {response.status_code}: {response.text[:200]}")
        if not self.model:
            if not listed:
                raise LLMError(f"{url} lists no model: pass --llm-model NAME or set {ENV_MODEL}")
            self.model = listed[0]
        return self.model

    def _cached_model(self) -> str:
        folder = self.options.cache_dir
        models: set[str] = set()
        for path in folder.glob("*/*.json") if folder is not None else ():
            try:
                models.add(str(json.loads(path.read_text())["request"]["model"]))
            except (ValueError, KeyError, TypeError, OSError):
                continue
        if not models:
            raise LLMError(f"the language model cache {folder} holds no answers: nothing to label from it")
        if len(models) > 1:
            raise LLMError(f"the cache {folder} holds answers of several models ({', '.join(sorted(models))}): "
                           f"pass --llm-model NAME")  # fmt: skip
        return models.pop()

    def _cache_path(self, key: str) -> Path | None:
        folder = self.options.cache_dir
        return None if folder is None else folder / key[:2] / f"{key}.json"

    def post(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """POST with cache and retries; returns (answer JSON, answered from cache)."""
        body = {"model": self.model, **payload}
        key = hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()
        cache = self._cache_path(key)
        if cache is not None and cache.is_file():
            try:
                entry = json.loads(cache.read_text())
                answer = entry["response"]
                self.usage.timed(entry.get("seconds"))
                return answer, True
            except (ValueError, KeyError, TypeError, OSError):
                pass  # a damaged entry is simply fetched again
        if self.options.cache_only:
            raise LLMCacheMiss(f"no cached answer for this {path} request")
        started = time.perf_counter()
        answer = self._post_with_retries(path, body)
        seconds = round(time.perf_counter() - started, 3)
        self.usage.timed(seconds)
        if cache is not None:
            # Whole or not at all, safe beside writers of the same key on other workers sharing the folder: each
            # writes a temporary file of its own and renames it into place.
            write_json(cache, {"request": body, "response": answer, "seconds": seconds})
        return answer, False

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url, last = f"{self.options.url}{path}", ""
        for attempt in range(self.options.retries + 1):
            if attempt:
                delay = self.options.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (1 + 0.25 * random.random()))
            started = time.perf_counter()
            try:
                response = self.http.post(path, json=body)
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            finally:
                with self.usage.lock:
                    self.usage.server_seconds += time.perf_counter() - started
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise LLMError(f"{url}: answer is not JSON: {response.text[:200]!r}") from None
            last = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in RETRY_STATUS:
                raise LLMError(f"{url}: {last}")
        raise LLMError(f"{url}: gave up after {self.options.retries + 1} tries ({last})")

    def _count(self, answer: dict[str, Any], cached: bool) -> tuple[int, int]:
        usage = answer.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        with self.usage.lock:
            self.usage.calls += 1
            self.usage.cached += int(cached)
            self.usage.prompt_tokens += prompt
            self.usage.completion_tokens += completion
        return prompt, completion

    # ------------------------------------------------------------------ calls

    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int = 96, temperature: float = 0.0) -> Completion:
        payload = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature, "seed": 0}
        answer, cached = self.post("/chat/completions", payload)
        try:
            text = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.options.url}/chat/completions: unexpected answer {str(answer)[:200]}") from None
        prompt, completion = self._count(answer, cached)
        return Completion(text.strip(), prompt, completion, cached)

    def yes_probability(self, messages: Sequence[dict[str, str]]) -> YesProbability:
        """P(Yes) for a question whose answer starts with Yes or No (first-token log-probabilities)."""
        payload = {"messages": list(messages), "max_tokens": 1, "temperature": 0.0, "seed": 0,
                   "logprobs": True, "top_logprobs": 10}  # fmt: skip
        answer, cached = self.post("/chat/completions", payload)
        prompt, _ = self._count(answer, cached)
        return YesProbability(yes_share(answer), prompt, cached)

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "llm", progress: bool = True) -> list[R]:
        """fn over items on the client's thread pool, results in order; the first error stops the run."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            futures = [pool.submit(fn, item) for item in items]
            bar = tqdm(total=len(items), desc=desc, unit="call", disable=not progress)
            try:
                results = []
                for future in futures:
                    results.append(future.result())
                    bar.update()
                return results
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()


def yes_share(answer: dict[str, Any]) -> float:
    """P(Yes) / (P(Yes) + P(No)) from a chat answer with first-token top log-probabilities; falls back to the text
    (1.0 / 0.0) when the server sent none, and 0.5 when neither word appears."""
    try:
        choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"unexpected chat answer {str(answer)[:200]}") from None
    p_yes = p_no = 0.0
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content:
        first = content[0]
        options = first.get("top_logprobs") or [{"token": first.get("token", ""), "logprob": first.get("logprob")}]
        for option in options:
            word = str(option.get("token", "")).strip().lower()
            logprob = option.get("logprob")
            if logprob is None or not math.isfinite(float(logprob)):
                continue
            if word and "yes".startswith(word) and word[0] == "y":
                p_yes += math.exp(float(logprob))
            elif word and "no".startswith(word) and word[0] == "n":
                p_no += math.exp(float(logprob))
    if p_yes + p_no > 0:
        return p_yes / (p_yes + p_no)
    text = str((choice.get("message") or {}).get("content") or "").strip().lower()
    return 1.0 if text.startswith("y") else 0.0 if text.startswith("n") else 0.5
