"""Turning a trained run, or a recommender we did not train, into bundle contents (ONNX + items + users)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from recsae_core.bundle.format import BundleContents, InputSpec, read_tensors, sha256_file
from recsae_core.common.errors import ArtifactError, DataError
from recsae_core.common.layout import RunLayout
from recsae_core.common.onnx import cast_to_declared, h_output, load_inputs, open_onnx
from recsae_core.data.splits import Ragged
from recsae_core.recommenders.batching import make_batch
from recsae_core.recommenders.contract_export import PARITY_TOLERANCE, parity_figures, past_tolerance
from recsae_core.recommenders.onnx_model import OnnxRecommender
from recsae_core.recommenders.recipe import Recipe
from recsae_core.recommenders.run import RunContext


def input_spec(recipe: Recipe, custom_names: list[str] | None = None) -> InputSpec:
    """How the bundle feeds a model wrapped by `recipe`: a sequence recipe is a 'history' bundle (its padding, pad
    index and length input), a user-index recipe a 'user' bundle, a custom one 'custom' over `custom_names`."""
    if recipe.kind == "sequence":
        length = recipe.inputs.get("length")
        return InputSpec("history", recipe.input_names, recipe.inputs["items"], recipe.max_len, recipe.pad_index,
                         padding=recipe.padding, length_input=length)  # fmt: skip
    if recipe.kind == "user_index":
        return InputSpec("user", [recipe.inputs["user"]])
    return InputSpec("custom", list(custom_names or []))


def full_histories(ctx: RunContext) -> Ragged:
    """Every known item of every user in time order (train, then valid, then test): what the service sees."""
    split = ctx.split
    return Ragged.from_lists(
        [np.concatenate([split.train.row(u), split.valid.row(u), split.test.row(u)]) for u in range(split.n_users)]
    )


def ridge_foldin(item_embeddings: np.ndarray, reg: float = 1.0) -> np.ndarray:
    """(d, n_items) map P with h = P @ y the ridge fit of y ~ E h, y the 0/1 history vector of a new user."""
    e = item_embeddings.astype(np.float64)
    gram = e.T @ e + reg * np.eye(e.shape[1])
    return np.linalg.solve(gram, e.T).astype(np.float32)


def check_parity(
    ctx: RunContext, onnx_path: Path, users: np.ndarray, seen: Ragged, user_inputs: dict[str, np.ndarray]
) -> dict[str, float]:
    """The bundle's ONNX model on the bundle's own per-user inputs (what the service feeds) vs the run's recommender
    `represent` on the same users, fed through its recipe from batches: `parity_figures`; refuses to bundle past
    `PARITY_TOLERANCE`. (A model trained here was checked against PyTorch when its contract was written:
    `contract_parity` in its metrics.)"""
    session = open_onnx(onnx_path)
    batch = make_batch(ctx.model, users, seen, "cpu")
    feed = {name: values[users] for name, values in user_inputs.items()}
    with torch.no_grad():
        h_run = ctx.model.represent(batch)
        s_run = ctx.model.score(h_run).numpy()
    h_onnx = session.run([h_output(session, onnx_path)], feed)[0]
    s_onnx = h_onnx @ ctx.model.item_embeddings().detach().numpy().T
    bias = ctx.model.item_bias()
    if bias is not None:
        s_onnx = s_onnx + bias.detach().numpy()
    parity = {"users_checked": len(users), **parity_figures(h_onnx, h_run.numpy(), s_onnx, s_run)}
    if past_tolerance(parity):
        raise ArtifactError(f"{onnx_path}: the bundle's inputs and the run's recommender disagree beyond "
                            f"{PARITY_TOLERANCE} (relative to max(1, |value|)): {parity}")  # fmt: skip
    return parity


def _contract_inputs(model: OnnxRecommender, seen: Ragged) -> tuple[Path, InputSpec, dict[str, np.ndarray]]:
    """Every recommender is a contract by now: its own ONNX file, and every user's inputs built by its recipe from
    the user's full history (sequence) or the user's index in the model (user_index, custom)."""
    users = np.arange(len(seen.lengths))
    # stored as the model declares its inputs, so the service feeds rows (and builds histories) as stored
    user_inputs = cast_to_declared(model.contract.session, model.feed(users, [seen.row(u) for u in users]))
    return model.onnx_path, input_spec(model.recipe, list(user_inputs)), user_inputs


def contents_from_run(ctx: RunContext, sae_folder: Path, workdir: Path) -> tuple[BundleContents, dict[str, float]]:
    """Gather everything the bundle needs from a run: its recommender's contract (ONNX model, items, recipe),
    per-user inputs from each user's full history, the dataset's own user and item ids, seen items. `workdir` is
    kept for callers that stage files; the contract's own files are copied by the bundle writer."""
    model = ctx.model.cpu().eval()
    if not isinstance(model, OnnxRecommender):
        raise ArtifactError(f"{ctx.root}: the recommender is not read as its contract; load the run with load_run")
    seen = full_histories(ctx)
    onnx_path, inputs, user_inputs = _contract_inputs(model, seen)
    rng = np.random.default_rng(0)
    sample = rng.choice(ctx.split.n_users, min(512, ctx.split.n_users), False)
    parity = check_parity(ctx, onnx_path, sample, seen, user_inputs)
    item_embeddings = model.item_embeddings().detach().numpy()
    bias = model.item_bias()
    meta = {
        "dataset": ctx.config["dataset"],
        "model": model.name,
        "protocol": ctx.config["protocol"],
        "seed": ctx.config["seed"],
    }
    checkpoint = RunLayout(ctx.root).recommender_model
    if checkpoint.is_file():  # policies record the checkpoint they were made for; the service compares
        meta["recommender_sha256"] = sha256_file(checkpoint)
    # History requests of user-embedding models are folded in; sequence models take them as they are, and custom
    # inputs cannot be built from a history at all.
    foldin = ridge_foldin(item_embeddings) if inputs.kind == "user" else None
    contents = BundleContents(
        onnx_path=onnx_path,
        inputs=inputs,
        item_embeddings=item_embeddings,
        item_ids=ctx.dataset.item_tokens,
        titles=ctx.dataset.item_meta.titles,
        genres=ctx.dataset.item_meta.genres,
        years=ctx.dataset.item_meta.years,
        popularity=ctx.split.item_popularity(),
        user_ids=ctx.dataset.user_tokens,
        user_inputs=user_inputs,
        seen=(seen.indptr, seen.values),
        sae_folder=sae_folder,
        meta=meta,
        item_bias=None if bias is None else bias.detach().numpy(),
        foldin=foldin,
        # written only where the model's item indices are not the bundle's dense order (models trained elsewhere)
        model_index=None if np.array_equal(model.model_items, np.arange(len(model.model_items))) else model.model_items,
    )
    return contents, parity


def read_items_csv(path: Path, n_items: int) -> tuple[list[str], list[str], list[list[str]], np.ndarray]:
    """ids, titles, genres ('|'-separated) and popularity (optional column) from an items CSV, one row per item."""
    if not path.is_file():
        raise DataError(f"{path}: items file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "item_id" not in rows[0]:
        raise DataError(f"{path}: expected a header with at least 'item_id' (optional: title, genres, popularity)")
    if len(rows) != n_items:
        raise DataError(f"{path}: {len(rows)} item rows, but the item embedding matrix has {n_items} rows")
    ids = [r["item_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: item_id values are not unique")
    titles = [r.get("title") or r["item_id"] for r in rows]
    genres = [[g for g in (r.get("genres") or "").split("|") if g] for r in rows]
    try:
        popularity = np.array([int(r.get("popularity") or 0) for r in rows], dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: 'popularity' must be an integer count") from None
    return ids, titles, genres, popularity


def contents_from_onnx(
    onnx_path: Path, embeddings_path: Path, items_csv: Path, user_inputs_path: Path, sae_folder: Path, name: str
) -> BundleContents:
    """Bundle contents around a recommender we did not train: its ONNX `inputs -> h`, its item matrix and items."""
    session = open_onnx(onnx_path)
    user_inputs = load_inputs(user_inputs_path, session)
    tensors = read_tensors(embeddings_path)
    if "item_embeddings" not in tensors:
        raise ArtifactError(f"{embeddings_path}: needs a tensor named 'item_embeddings' (n_items, d)")
    emb = tensors["item_embeddings"].astype(np.float32)
    if emb.ndim != 2 or not np.isfinite(emb).all():
        raise ArtifactError(f"{embeddings_path}: item_embeddings must be a finite 2-D matrix, got shape {emb.shape}")
    bias = tensors.get("item_bias")
    ids, titles, genres, popularity = read_items_csv(items_csv, len(emb))
    n_users = len(next(iter(user_inputs.values())))
    probe = session.run([h_output(session, onnx_path)], {k: v[:1] for k, v in user_inputs.items()})[0]
    if probe.shape[-1] != emb.shape[1]:
        raise ArtifactError(f"{onnx_path}: h has width {probe.shape[-1]} but item_embeddings has d={emb.shape[1]}")
    return BundleContents(
        onnx_path=onnx_path,
        inputs=InputSpec("custom", list(user_inputs)),
        item_embeddings=emb,
        item_ids=ids,
        titles=titles,
        genres=genres,
        popularity=popularity,
        user_ids=[str(i) for i in range(n_users)],
        user_inputs=user_inputs,
        seen=(np.zeros(n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)),
        sae_folder=sae_folder,
        meta={"dataset": name, "model": "imported-onnx", "source": str(onnx_path)},
        item_bias=None if bias is None else bias.astype(np.float32),
    )
