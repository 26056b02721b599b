"""Language-model labeler: RecSAE's explain prompt (few-shot) names a latent from its describing samples, and a
yes/no detection prompt scores the explanation on held-out samples by the probability the model gives to "Yes".
Requests go through `recsae_core.concepts.llm_client` (any OpenAI-compatible endpoint; cached, retried, resumable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from recsae_core.concepts.labelers import slug
from recsae_core.concepts.samples import LatentSamples
from recsae_core.concepts.scoring import Labelled, best_threshold, score_latent

if TYPE_CHECKING:  # httpx is only needed with the language-model labeler
    from recsae_core.concepts.llm_client import LLMClient

T = TypeVar("T")


EXPLAIN_SYSTEM = (
    "We are studying neurons of a movie recommendation model. Each neuron looks for some particular kind of user "
    "or viewing history. Look at the samples where the neuron fires (each lists the user's recent movies, the movie "
    "the model recommends next, and how strongly the neuron fires, 1-10) and say what the neuron is looking for. "
    "Answer with exactly two lines:\n"
    "Name: two or three lowercase words joined by hyphens\n"
    "Explanation: the main thing this neuron does is find <one short phrase>"
)
FEW_SHOT = (
    (
        "Sample 1:\nRecent items: Alien (Action|Horror|Sci-Fi, 1979); The Shining (Horror, 1980); Halloween "
        "(Horror, 1978)\nRecommended next: The Thing (Action|Horror|Sci-Fi, 1982)\nActivation level: 10\n\n"
        "Sample 2:\nRecent items: Psycho (Horror|Thriller, 1960); Carrie (Horror, 1976); Jaws (Action|Horror, 1975)"
        "\nRecommended next: The Omen (Horror, 1976)\nActivation level: 8",
        "Name: classic-horror\nExplanation: the main thing this neuron does is find users watching horror films "
        "from the 1970s and 1980s and recommend more horror.",
    ),
    (
        "Sample 1:\nRecent items: Toy Story (Animation|Children's|Comedy, 1995); Aladdin (Animation|Children's|"
        "Musical, 1992); Babe (Children's|Comedy|Drama, 1995)\nRecommended next: The Lion King (Animation|"
        "Children's|Musical, 1994)\nActivation level: 9\n\nSample 2:\nRecent items: Pinocchio (Animation|"
        "Children's, 1940); Dumbo (Animation|Children's|Musical, 1941)\nRecommended next: Cinderella (Animation|"
        "Children's|Musical, 1950)\nActivation level: 7",
        "Name: family-animation\nExplanation: the main thing this neuron does is find families watching animated "
        "children's films such as Disney classics.",
    ),
)
DETECT_SYSTEM = (
    "You check whether a sample from a movie recommender matches the description of a neuron. The sample lists a "
    "user's recent movies and the movie the model recommends next. Answer with one word: Yes or No."
)


def explain_messages(samples: list[str]) -> list[dict[str, str]]:
    """RecSAE's explain prompt, few-shot: samples (with levels) -> 'Name: ... / Explanation: ...'."""
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for shots, answer in FEW_SHOT:
        messages += [{"role": "user", "content": shots}, {"role": "assistant", "content": answer}]
    body = "\n\n".join(f"Sample {i}:\n{text}" for i, text in enumerate(samples, start=1))
    return [*messages, {"role": "user", "content": body}]


def detect_messages(explanation: str, sample: str) -> list[dict[str, str]]:
    """The yes/no detection question; the explanation comes first so a server can reuse the prompt prefix."""
    question = (
        f"Neuron description: {explanation}\n\nSample:\n{sample}\n\n"
        "Does this sample match the description? Answer Yes or No."
    )
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": question}]


def parse_explanation(text: str) -> tuple[str, str]:
    """(name slug or '', explanation sentence) from a model answer; tolerant of missing labels and extra lines."""
    name, explanation = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "name" and not name:
            name = slug(value)[:40].strip("-")
        elif key.strip().lower() == "explanation" and not explanation:
            explanation = value.strip()
    if not explanation:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lower().startswith("name:")]
        explanation = lines[0] if lines else ""
    explanation = explanation.strip().strip('"')
    if explanation and not explanation.endswith("."):
        explanation += "."
    return name, explanation[:300]


def llm_label(
    client: LLMClient, latents: list[LatentSamples], render: Callable[[int, int | None], str],
    levels: dict[tuple[int, int], int], shown: int = 5, progress: bool = True,
) -> dict[int, Labelled]:  # fmt: skip
    """Explain each latent from its top `shown` describing samples (with levels, few-shot), then score the
    explanation by P(Yes) on held-out samples. The paper-protocol threshold is calibrated on the next `shown`
    describing samples (never shown) against as many background inactive samples; nothing held out is used.
    `render(sample, level or None)` shows a sample; `levels[(latent, sample)]` gives shown samples' levels.
    A cache-only client labels just the latents whose every answer is cached."""

    def explain(s: LatentSamples) -> tuple[str, str] | None:
        texts = [render(int(i), levels.get((s.latent, int(i)))) for i in s.describe[:shown]]
        answer = _or_missing(lambda: client.chat(explain_messages(texts), max_tokens=80))
        return None if answer is None else parse_explanation(answer.text)

    explained = {i: answer for i, answer in enumerate(client.map(explain, latents, "explain", progress)) if answer}
    kinds = ("calib_pos", "calib_neg", "paper_pos", "paper_neg", "detect_pos", "detect_neg")
    jobs: list[tuple[int, str, int]] = []
    for index, s in enumerate(latents):
        if index not in explained:
            continue
        groups = (s.describe[shown : 2 * shown], s.calibrate_neg[:shown], s.paper_pos, s.paper_neg, s.detect_pos,
                  s.detect_neg)  # fmt: skip
        jobs += [(index, kind, int(i)) for kind, ids in zip(kinds, groups, strict=True) for i in ids]

    def detect(job: tuple[int, str, int]) -> float | None:
        messages = detect_messages(explained[job[0]][1], render(job[2], None))
        answer = _or_missing(lambda: client.yes_probability(messages))
        return None if answer is None else answer.p_yes

    probs = client.map(detect, jobs, "detect", progress)
    by: dict[tuple[int, str], list[float]] = {}
    incomplete = set(range(len(latents))) - set(explained)
    for (index, kind, _), p in zip(jobs, probs, strict=True):
        if p is None:
            incomplete.add(index)
        else:
            by.setdefault((index, kind), []).append(p)
    out = {}
    for index, s in enumerate(latents):
        if index in incomplete:
            continue
        g = {k: np.asarray(by.get((index, k), []), dtype=float) for k in kinds}
        threshold = best_threshold(g["calib_pos"], g["calib_neg"]) if len(g["calib_pos"]) else 0.5
        scores = score_latent(g["paper_pos"], g["paper_neg"], g["detect_pos"], g["detect_neg"], threshold)
        name, explanation = explained[index]
        out[s.latent] = Labelled(name or "unnamed", explanation or "No explanation given.", scores, threshold)
    return out


def _or_missing(ask: Callable[[], T]) -> T | None:
    """The answer, or None when a cache-only client's cache lacks it (the latent then keeps its metadata label)."""
    from recsae_core.concepts.llm_client import LLMCacheMiss

    try:
        return ask()
    except LLMCacheMiss:  # only cache-only clients raise it
        return None
