"""A synthetic two-tower recommender generated from a seed, written as the files `recsae import` takes (issue 19's
scale benchmark): nothing of it is committed, the same seed gives the same model and log on any machine.

The model: a user tower (a user-id embedding, then a residual MLP, exported to ONNX: `user_idx -> h`) and an item
tower given as its output, the item matrix E (scores = h E^T). Both towers mix a few of `n_topics` random unit
directions, so h has the sparse structure an SAE can find; items' main topics follow a Zipf law, so some topics are
popular. Every row of E (and of the user embedding) is drawn from its own chunk's generator, so the first n items of
a larger catalogue are exactly the items of a catalogue of n: catalogues of several sizes are prefixes of one.

The log names every user once (so the import keeps every user, and the probe has one h per user); `eval_users` of
them, spread over the id range, get two more interactions, enough for a leave-one-out valid and test item, so the
import's evaluation and the SAE's selection cover those users only and stay cheap at a million users. Items are drawn
from the user's main topic within the imported catalogue.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from recsae_core.common.errors import ConfigError
from recsae_core.common.ranges import NonNegativeInt, PositiveInt, check_fields

CHUNK = 65_536
"""Rows drawn per generator: row i depends only on the seed and i // CHUNK."""
USER_STREAM, ITEM_STREAM, TOWER_STREAM, LOG_STREAM, TOPIC_STREAM = range(5)
NOISE = 0.02
"""Std of the isotropic noise added to every row."""
EVAL_INTERACTIONS = 3
"""Interactions of an evaluated user: one to train on, one valid and one test item (leave-one-out)."""


@dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic two-tower model and its interaction log."""

    n_users: PositiveInt = 1_000_000
    """Users of the model (rows of the user embedding)."""
    n_items: PositiveInt = 10_000
    """Items of the imported catalogue (the first rows of the seeded item matrix)."""
    dim: PositiveInt = 64
    """Width of h and of the item embeddings."""
    hidden: PositiveInt = 256
    """Hidden width of the user tower's residual MLP."""
    n_topics: PositiveInt = 128
    """Random unit directions both towers mix."""
    eval_users: NonNegativeInt = 2_000
    """Users with a valid and a test interaction (the rest have one)."""
    seed: NonNegativeInt = 0
    """Seed of everything."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.eval_users > self.n_users:
            raise ConfigError(
                f"SyntheticSpec.eval_users {self.eval_users} exceeds SyntheticSpec.n_users {self.n_users}"
            )
        if self.dim < 2:
            raise ConfigError(f"SyntheticSpec.dim must be at least 2, got {self.dim}")


class SyntheticFiles(NamedTuple):
    """What `recsae import` is given."""

    onnx: Path
    """The user tower: user_idx (B,) int64 -> h (B, dim)."""
    item_embeddings: Path
    """safetensors with item_embeddings (n_items, dim)."""
    recipe: Path
    """The user-index recipe, its id maps beside it."""
    interactions: Path
    """The interaction log (CSV: user_id, item_id, timestamp)."""


def user_id(index: int) -> str:
    return f"u{index}"


def item_id(index: int) -> str:
    return f"i{index}"


def topics(spec: SyntheticSpec) -> np.ndarray:
    """(n_topics, dim) unit directions."""
    raw = np.random.default_rng((spec.seed, TOPIC_STREAM)).normal(size=(spec.n_topics, spec.dim))
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def _zipf_topics(rng: np.random.Generator, n: int, n_topics: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_topics + 1)
    return rng.choice(n_topics, size=n, p=weights / weights.sum())


def _mixtures(spec: SyntheticSpec, stream: int, n: int, per_row: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) rows each mixing `per_row` topics (the first Zipf-drawn, the others uniform), and each row's main
    topic; chunk by chunk, so that row i does not depend on n."""
    directions = topics(spec)
    rows, main = np.empty((n, spec.dim), np.float32), np.empty(n, np.int64)
    for start in range(0, n, CHUNK):
        rng = np.random.default_rng((spec.seed, stream, start // CHUNK))
        size = CHUNK  # the whole chunk is drawn whatever part of it is kept
        first = _zipf_topics(rng, size, spec.n_topics)
        others = rng.integers(0, spec.n_topics, size=(size, per_row - 1))
        chosen = np.concatenate([first[:, None], others], axis=1)
        weights = np.sort(rng.exponential(1.0, size=(size, per_row)), axis=1)[:, ::-1]
        # Convex weights keep rows within the unit ball and scores within about [-1, 1], as a trained two-tower
        # model's normalised towers would.
        weights /= weights.sum(axis=1, keepdims=True)
        mixed = np.einsum("rk,rkd->rd", weights, directions[chosen]) + noise * rng.normal(size=(size, spec.dim))
        end = min(start + CHUNK, n)
        rows[start:end] = mixed[: end - start]
        main[start:end] = first[: end - start]
    return rows, main


def item_matrix(spec: SyntheticSpec, n_items: int | None = None) -> np.ndarray:
    """The first `n_items` rows (default: the imported catalogue) of the seeded item matrix, (n_items, dim)."""
    return _mixtures(spec, ITEM_STREAM, spec.n_items if n_items is None else n_items, 2, NOISE)[0]


def user_embeddings(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, dim) user-id embeddings and each user's main topic."""
    return _mixtures(spec, USER_STREAM, spec.n_users, 3, NOISE)


def eval_user_index(spec: SyntheticSpec) -> np.ndarray:
    """The users with a valid and a test interaction, spread evenly over the id range."""
    if spec.eval_users == 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, spec.n_users - 1, spec.eval_users).round().astype(np.int64))


def interaction_log(spec: SyntheticSpec, user_topic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of the log in time order: one interaction per user, then two more for each evaluated user,
    each item drawn uniformly among the imported items of the user's main topic (any item where there is none)."""
    rng = np.random.default_rng((spec.seed, LOG_STREAM))
    item_topic = _mixtures(spec, ITEM_STREAM, spec.n_items, 2, NOISE)[1]
    order = np.argsort(item_topic, kind="stable")
    counts = np.bincount(item_topic, minlength=spec.n_topics)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    extra = np.repeat(eval_user_index(spec), EVAL_INTERACTIONS - 1)
    users = np.concatenate([np.arange(spec.n_users, dtype=np.int64), np.sort(extra, kind="stable")])
    topic = user_topic[users]
    offset = (rng.random(len(users)) * np.maximum(counts[topic], 1)).astype(np.int64)
    items = np.where(counts[topic] > 0, order[np.minimum(starts[topic] + offset, spec.n_items - 1)],
                     rng.integers(0, spec.n_items, len(users)))  # fmt: skip
    return users, items


def user_tower(spec: SyntheticSpec, embeddings: np.ndarray):  # -> torch.nn.Module (torch imported lazily)
    """user_idx -> e + W2 gelu(W1 e): the embedding with a residual MLP, its weights seeded."""
    import torch
    from torch import nn

    rng = np.random.default_rng((spec.seed, TOWER_STREAM))

    class UserTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding.from_pretrained(torch.from_numpy(embeddings), freeze=True)
            self.fc1, self.fc2 = nn.Linear(spec.dim, spec.hidden), nn.Linear(spec.hidden, spec.dim)
            with torch.no_grad():
                for layer, scale in ((self.fc1, 1.0 / np.sqrt(spec.dim)), (self.fc2, 0.3 / np.sqrt(spec.hidden))):
                    layer.weight.copy_(torch.from_numpy(rng.normal(0, scale, layer.weight.shape).astype(np.float32)))
                    layer.bias.zero_()

        def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
            e = self.embedding(user_idx)
            return e + self.fc2(nn.functional.gelu(self.fc1(e)))

    return UserTower().eval()


def _write_map(path: Path, column: str, ids: list[str]) -> None:
    lines = [f"{column},index", *(f"{raw},{i}" for i, raw in enumerate(ids))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_import_files(spec: SyntheticSpec, folder: Path) -> SyntheticFiles:
    """Generate the model and its log from `spec` and write the files `recsae import` takes into `folder`, with
    spec.json recording what they were generated from."""
    import torch
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = SyntheticFiles(folder / "user_tower.onnx", folder / "items.safetensors", folder / "recipe.json",
                           folder / "log.csv")  # fmt: skip
    embeddings, user_topic = user_embeddings(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are expected and say nothing here
        torch.onnx.export(
            user_tower(spec, embeddings), (torch.tensor([0, 1]),), str(files.onnx), input_names=["user_idx"],
            output_names=["h"], dynamic_axes={"user_idx": {0: "batch"}, "h": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )  # fmt: skip
    save_file({"item_embeddings": item_matrix(spec)}, str(files.item_embeddings))
    _write_map(folder / "user_map.csv", "user_id", [user_id(u) for u in range(spec.n_users)])
    _write_map(folder / "item_map.csv", "item_id", [item_id(i) for i in range(spec.n_items)])
    recipe = {"kind": "user_index", "inputs": {"user": "user_idx"}, "user_index": "user_map.csv",
              "item_index": "item_map.csv"}  # fmt: skip
    files.recipe.write_text(json.dumps(recipe, indent=1))
    users, items = interaction_log(spec, user_topic)
    rows = (f"u{u},i{i},{t}" for t, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True)))
    files.interactions.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return files
