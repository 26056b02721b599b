"""Language-model labeler: RecSAE's explain prompt (few-shot) names a latent from its describing samples, and a
yes/no detection prompt scores the explanation on held-out samples by the probability the model gives to "Yes".
Requests go through `recsae_core.concepts.llm_client` (any OpenAI-compatible endpoint; cached, retried, resumable).

On a Ray cluster, chunks of latents are labelled by Ray actors (`llm_label_on_ray`), each with a client of its own to
the same endpoint and the same cache folder (on storage every node mounts): a latent's label reads its own samples
and prompts alone, so the labels are the one-process ones; the samples are rendered on the driver and shipped as text,
so the workers need neither the run nor its data."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np

from recsae_core.concepts.labelers import slug
from recsae_core.concepts.samples import LatentSamples
from recsae_core.concepts.scoring import Labelled, best_threshold, score_latent

if TYPE_CHECKING:  # httpx is only needed with the language-model labeler
    from recsae_core.common.ray_cluster import RayConfig
    from recsae_core.concepts.llm_client import LLMClient, LLMOptions, Usage

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


def shown_samples(s: LatentSamples, shown: int) -> np.ndarray:
    """The describing samples shown to the model to explain latent `s` (its top ones)."""
    return s.describe[:shown]


def detect_groups(s: LatentSamples, shown: int) -> tuple[np.ndarray, ...]:
    """The samples whose P(Yes) is asked for latent `s`, one group per kind of `KINDS`: the threshold is calibrated
    on the next `shown` describing samples (never shown) against as many background inactive samples."""
    return s.describe[shown : 2 * shown], s.calibrate_neg[:shown], s.paper_pos, s.paper_neg, s.detect_pos, s.detect_neg


KINDS = ("calib_pos", "calib_neg", "paper_pos", "paper_neg", "detect_pos", "detect_neg")


def llm_label(
    client: LLMClient, latents: list[LatentSamples], render: Callable[[int, int | None], str],
    levels: dict[tuple[int, int], int], shown: int = 5, progress: bool = True, ray_config: RayConfig | None = None,
) -> dict[int, Labelled]:  # fmt: skip
    """Explain each latent from its top `shown` describing samples (with levels, few-shot), then score the
    explanation by P(Yes) on held-out samples. The paper-protocol threshold is calibrated on the next `shown`
    describing samples (never shown) against as many background inactive samples; nothing held out is used.
    `render(sample, level or None)` shows a sample; `levels[(latent, sample)]` gives shown samples' levels.
    A cache-only client labels just the latents whose every answer is cached. When `ray_config` names a cluster,
    chunks of latents are labelled by Ray actors (`llm_label_on_ray`): the same labels."""
    if ray_config is not None and ray_config.on_ray:
        return llm_label_on_ray(client, latents, render, levels, shown, ray_config).labels

    def explain(s: LatentSamples) -> tuple[str, str] | None:
        texts = [render(int(i), levels.get((s.latent, int(i)))) for i in shown_samples(s, shown)]
        answer = _or_missing(lambda: client.chat(explain_messages(texts), max_tokens=80))
        return None if answer is None else parse_explanation(answer.text)

    explained = {i: answer for i, answer in enumerate(client.map(explain, latents, "explain", progress)) if answer}
    jobs: list[tuple[int, str, int]] = []
    for index, s in enumerate(latents):
        if index in explained:
            groups = zip(KINDS, detect_groups(s, shown), strict=True)
            jobs += [(index, kind, int(i)) for kind, ids in groups for i in ids]

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
        g = {k: np.asarray(by.get((index, k), []), dtype=float) for k in KINDS}
        threshold = best_threshold(g["calib_pos"], g["calib_neg"]) if len(g["calib_pos"]) else 0.5
        scores = score_latent(g["paper_pos"], g["paper_neg"], g["detect_pos"], g["detect_neg"], threshold)
        name, explanation = explained[index]
        out[s.latent] = Labelled(name or "unnamed", explanation or "No explanation given.", scores, threshold)
    return out


class Rendered(NamedTuple):
    """A `render` function as a table of its answers: what Ray workers get instead of the run it renders from."""

    texts: dict[tuple[int, int | None], str]
    """(sample, level or None) -> the sample as shown."""

    def __call__(self, sample: int, level: int | None) -> str:
        return self.texts[(sample, level)]


def prerender(
    latents: list[LatentSamples], render: Callable[[int, int | None], str], levels: dict[tuple[int, int], int],
    shown: int,
) -> Rendered:  # fmt: skip
    """Every text `llm_label` asks `render` for when labelling `latents`."""
    keys: dict[tuple[int, int | None], None] = {}
    for s in latents:
        keys.update({(int(i), levels.get((s.latent, int(i)))): None for i in shown_samples(s, shown)})
        keys.update({(int(i), None): None for group in detect_groups(s, shown) for i in group})
    return Rendered({key: render(*key) for key in keys})


class ChunkJob(NamedTuple):
    """What every Ray actor labelling chunks of latents shares (shipped once)."""

    options: LLMOptions
    """The driver's resolved options, with its checked model and an absolute cache folder."""
    render: Rendered
    """The samples as shown."""
    levels: dict[tuple[int, int], int]
    """(latent, sample) -> level of the shown samples."""
    shown: int
    """Samples shown per latent."""


class ChunkLabels(NamedTuple):
    """One chunk's labels, what its client used, and which process asked."""

    labels: dict[int, Labelled]
    """Latent -> label, for the latents of the chunk that were labelled."""
    usage: Usage
    """Calls, cache hits, tokens and seconds of the chunk's client."""
    worker: str
    """host:pid of the Ray worker."""


class OnRayLabels(NamedTuple):
    """`llm_label_on_ray`'s result."""

    labels: dict[int, Labelled]
    """Latent -> label, in the order of the latents given (as `llm_label` returns them)."""
    workers: tuple[str, ...]
    """host:pid of the Ray workers that sent requests, in order of first chunk."""


def label_chunk(job: ChunkJob, chunk: list[LatentSamples]) -> ChunkLabels:
    """One chunk, on a Ray actor: `llm_label` with a client of its own (the driver checked the endpoint)."""
    from recsae_core.concepts.llm_client import LLMClient

    with LLMClient(job.options) as client:
        labels = llm_label(client, chunk, job.render, job.levels, job.shown, progress=False)
    return ChunkLabels(labels, client.usage, f"{socket.gethostname()}:{os.getpid()}")


def llm_label_on_ray(
    client: LLMClient, latents: list[LatentSamples], render: Callable[[int, int | None], str],
    levels: dict[tuple[int, int], int], shown: int, ray_config: RayConfig,
) -> OnRayLabels:  # fmt: skip
    """`llm_label(client, ...)` with chunks of latents labelled by Ray actors on the cluster of `ray_config`, each
    with a client of its own on `client`'s options (`client.check()` must have run: workers do not check) and
    concurrency; the chunks' usage is added to `client.usage`."""
    from recsae_core.common.ray_map import map_chunks

    if not latents:
        return OnRayLabels({}, ())
    folder = client.options.cache_dir
    # Workers do not start in the driver's folder: a relative cache folder would be another one on each of them.
    options = replace(client.options, model=client.model, cache_dir=None if folder is None else folder.resolve())
    job = ChunkJob(options, prerender(latents, render, levels, shown), levels, shown)
    parts = map_chunks(label_chunk, job, latents, ray_config)
    for part in parts:
        client.usage.add(part.usage)
    labels = {latent: label for part in parts for latent, label in part.labels.items()}
    return OnRayLabels(labels, tuple(dict.fromkeys(part.worker for part in parts)))


def _or_missing(ask: Callable[[], T]) -> T | None:
    """The answer, or None when a cache-only client's cache lacks it (the latent then keeps its metadata label)."""
    from recsae_core.concepts.llm_client import LLMCacheMiss

    try:
        return ask()
    except LLMCacheMiss:  # only cache-only clients raise it
        return None
