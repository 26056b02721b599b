"""Run llama-cpp-python's OpenAI-compatible server for the language-model labeler, without its log-probability waste.

When a request asks for log-probabilities, llama-cpp-python (0.3.x) turns the logits of *every* evaluated position
into log-probabilities (positions x vocabulary: about 33 M floats for a 220-token detection prompt with Qwen2.5's
152k-token vocabulary) and then keeps only the generated tokens' rows. On two CPU cores that is about a fifth of each
detection prompt's time. This launcher makes the conversion lazy, so only the rows that are read are computed; every
row is computed by the library's own function, so the answers are the same numbers. Everything else is the stock
server, with its own arguments:

    python scripts/llm_server.py --model FILE.gguf --host 127.0.0.1 --port 8088 --n_ctx 4096 --n_threads 2
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np


class LazyLogprobs:
    """Rows of log_softmax(logits), each computed only when indexed (by `convert`, the library's function)."""

    def __init__(self, logits: np.ndarray, convert: Callable[..., np.ndarray]) -> None:
        self.logits, self.convert = logits, convert

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.convert(self.logits[index], axis=-1)

    def __iter__(self) -> Any:
        return iter(self[:])


def patch_llama() -> bool:
    """Make `Llama.logits_to_logprobs` lazy for 2-D logits; returns False (and changes nothing) when the installed
    llama-cpp-python does not have the function this fixes."""
    from llama_cpp import Llama

    convert = getattr(Llama, "logits_to_logprobs", None)
    if convert is None or getattr(convert, "recsae_lazy", False):
        return convert is not None

    def lazy(logits: Any, axis: int = -1) -> Any:
        if isinstance(logits, np.ndarray) and logits.ndim == 2 and axis in (-1, 1):
            return LazyLogprobs(logits, convert)
        return convert(logits, axis=axis)

    lazy.recsae_lazy = True  # type: ignore[attr-defined]
    Llama.logits_to_logprobs = staticmethod(lazy)  # type: ignore[method-assign,assignment]
    return True


def main(argv: list[str] | None = None) -> None:
    try:
        from llama_cpp.server.__main__ import main as serve
    except ImportError:
        sys.exit("recsae: error: llama-cpp-python[server] is not installed (pip install 'llama-cpp-python[server]')")
    if not patch_llama():
        print("recsae: llama_cpp has no Llama.logits_to_logprobs; serving unpatched", file=sys.stderr)
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    serve()


if __name__ == "__main__":
    main()
