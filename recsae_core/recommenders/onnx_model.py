"""A recommender trained elsewhere, behind the Recommender interface: its contract is an ONNX model `inputs -> h`,
an item matrix E (scores = h E^T + b) and an input recipe (recommenders.recipe) saying how a user's inputs are built
in the model's own id space. Probing, SAE selection on dev NDCG, concepts and de-biasing then run on it unchanged.

`read_contract` validates the three files against each other (input names, dtypes and axes, h width vs E, maps vs
E rows, a trial run) before anything is written; `OnnxRecommender` joins a contract with a Dataset whose dense ids
the rest of recsae uses, translating dense ids to the model's indices on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file
from torch import nn

from recsae_core.common.errors import ArtifactError, DataError
from recsae_core.common.onnx import cast_to_declared, h_output, load_inputs, open_onnx
from recsae_core.data.datasets import Dataset
from recsae_core.recommenders.base import Batch, Recommender, RecommenderConfig
from recsae_core.recommenders.recipe import IdMap, Recipe, load_recipe

ITEM_TENSORS = ("item_embeddings", "item_bias")
"""The tensors an item-matrix file may hold: E (n_rows, d) and the optional bias b (n_rows,)."""
INDEX_TYPES = ("tensor(int64)", "tensor(int32)")
"""ONNX input types that item indices, user indices and lengths can be fed as."""


class ItemMatrix(NamedTuple):
    """The item side of the contract, as read from its safetensors file."""

    embeddings: np.ndarray
    """(n_rows, d) float32 E; row i is the model's item index i."""
    bias: np.ndarray | None
    """(n_rows,) float32 b, or None."""


def read_item_matrix(path: Path) -> ItemMatrix:
    """E and b from a safetensors file; refuses other tensor names (a typo would silently drop the bias), a non-2-D
    or non-finite E, and a bias of another length."""
    if not path.is_file():
        raise ArtifactError(f"{path}: item matrix file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from None
    if unknown := sorted(set(tensors) - set(ITEM_TENSORS)):
        raise ArtifactError(f"{path}: unknown tensor(s) {unknown}; expected item_embeddings and optional item_bias")
    if "item_embeddings" not in tensors:
        raise ArtifactError(f"{path}: needs a tensor named 'item_embeddings' (n_items, d)")
    emb = tensors["item_embeddings"]
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating) or not np.isfinite(emb).all() or 0 in emb.shape:
        raise ArtifactError(f"{path}: item_embeddings must be a finite, non-empty 2-D float matrix; got "
                            f"{emb.dtype} of shape {list(emb.shape)}")  # fmt: skip
    bias = tensors.get("item_bias")
    if bias is not None:
        if bias.shape != (len(emb),) or not np.issubdtype(bias.dtype, np.floating) or not np.isfinite(bias).all():
            raise ArtifactError(f"{path}: item_bias must be finite floats of shape [{len(emb)}] (one per row of "
                                f"item_embeddings); got {bias.dtype} of shape {list(bias.shape)}")  # fmt: skip
        bias = bias.astype(np.float32)
    return ItemMatrix(emb.astype(np.float32), bias)


@dataclass(frozen=True)
class Contract:
    """A validated contract: the model's files read, checked against each other, and its ONNX session open."""

    onnx_path: Path
    """The ONNX model, inputs -> h."""
    item_path: Path
    """The item matrix file."""
    recipe: Recipe
    """The input recipe, with the model's item (and user) id maps."""
    items: ItemMatrix
    """E and b, in the model's item index order."""
    session: ort.InferenceSession
    """One ONNX Runtime session, reused for every call."""
    h_name: str
    """The output that carries h."""
    users: IdMap | None
    """The model's user map: user_index recipes' map; custom recipes' map (index = row of the user inputs), or row
    order ('0'..'n-1') without one; None for sequence recipes, whose users are their histories."""
    user_inputs: dict[str, np.ndarray] | None
    """custom: the precomputed inputs, one row per user."""

    @property
    def dim(self) -> int:
        """Width of h (and of E)."""
        return int(self.items.embeddings.shape[1])


def _check_inputs(session: ort.InferenceSession, recipe: Recipe, onnx_path: Path) -> None:
    """The recipe names exactly the model's inputs, as integer tensors with a free batch axis and the right rank."""
    specs = {spec.name: spec for spec in session.get_inputs()}
    for role, name in recipe.inputs.items():
        if name is None:
            continue
        if name not in specs:
            raise DataError(f"{recipe.path}: inputs.{role} names '{name}', which is not an input of {onnx_path} "
                            f"(its inputs: {', '.join(specs)})")  # fmt: skip
        spec = specs[name]
        if spec.type not in INDEX_TYPES:
            raise ArtifactError(f"{onnx_path}: input '{name}' ({role}) has type {spec.type}; recsae feeds "
                                f"{role} as {' or '.join(INDEX_TYPES)}")  # fmt: skip
        shape = list(spec.shape)
        ranks = (2,) if role == "items" else (1, 2)
        if len(shape) not in ranks or (role != "items" and len(shape) == 2 and shape[1] not in (1, None)):
            wanted = "(batch, max_len)" if role == "items" else "(batch,) or (batch, 1)"
            raise ArtifactError(f"{onnx_path}: input '{name}' ({role}) has shape {shape}; expected {wanted}")
        if isinstance(shape[0], int):
            raise ArtifactError(f"{onnx_path}: input '{name}' has a fixed batch size {shape[0]}; export the model "
                                "with a dynamic first axis (torch.onnx.export(..., dynamic_axes=...))")  # fmt: skip
        if role == "items" and isinstance(shape[1], int) and shape[1] != recipe.max_len:
            raise DataError(f"{recipe.path}: max_len is {recipe.max_len}, but {onnx_path} input '{name}' has a "
                            f"fixed length of {shape[1]}")  # fmt: skip
    if recipe.kind != "custom" and (unfed := [n for n in specs if n not in recipe.input_names]):
        raise DataError(f"{recipe.path}: does not feed input(s) {unfed} of {onnx_path} "
                        f"(it feeds {', '.join(recipe.input_names)})")  # fmt: skip


def _custom_users(recipe: Recipe, inputs: dict[str, np.ndarray]) -> IdMap:
    """A custom recipe's user map: the one given (its indices are rows of the inputs), or row order."""
    n_rows = len(next(iter(inputs.values())))
    if recipe.users is None:
        ids = [str(row) for row in range(n_rows)]
        return IdMap(recipe.user_inputs or recipe.path, ids, np.arange(n_rows, dtype=np.int64),
                     {raw: row for row, raw in enumerate(ids)})  # fmt: skip
    beyond = np.flatnonzero(recipe.users.index >= n_rows)
    if len(beyond):
        row = int(beyond[0])
        raise DataError(f"{recipe.users.path}: line {row + 2}: index {int(recipe.users.index[row])} is outside "
                        f"{recipe.user_inputs}'s rows 0..{n_rows - 1}")  # fmt: skip
    return recipe.users


def read_contract(onnx_path: Path, item_path: Path, recipe_path: Path, threads: int = 0) -> Contract:
    """Read and cross-check a contract; every problem raises a RecsaeError naming the file at fault. Ends with a
    trial run of the model on two users so that h's shape and width are known to match E."""
    onnx_path, item_path, recipe_path = Path(onnx_path), Path(item_path), Path(recipe_path)
    items = read_item_matrix(item_path)
    recipe = load_recipe(recipe_path, n_items=len(items.embeddings))
    session = open_onnx(onnx_path, threads)
    h_name = h_output(session, onnx_path)
    _check_inputs(session, recipe, onnx_path)
    users, user_inputs = recipe.users, None
    if recipe.kind == "custom":
        assert recipe.user_inputs is not None  # load_recipe requires it for custom
        user_inputs = load_inputs(recipe.user_inputs, session)
        users = _custom_users(recipe, user_inputs)
    contract = Contract(onnx_path, item_path, recipe, items, session, h_name, users, user_inputs)
    h = run_contract(contract, _trial_feed(contract))
    if h.shape[1] != contract.dim:
        raise ArtifactError(f"{onnx_path}: h ('{h_name}') has width {h.shape[1]}, but item_embeddings in "
                            f"{item_path} has {contract.dim} columns")  # fmt: skip
    return contract


def _trial_feed(contract: Contract) -> dict[str, np.ndarray]:
    """Inputs for two users: a one-item and a full-length history, or the first two users of the map."""
    recipe = contract.recipe
    if recipe.kind == "sequence":
        known = recipe.items.index
        return recipe.sequence_inputs([known[:1], np.resize(known, recipe.max_len + 1)])
    assert contract.users is not None
    rows = contract.users.index[:2]
    if recipe.kind == "user_index":
        return recipe.user_index_inputs(rows)
    assert contract.user_inputs is not None
    return {name: values[rows] for name, values in contract.user_inputs.items()}


def run_contract(contract: Contract, feed: dict[str, np.ndarray]) -> np.ndarray:
    """h (B, d) float32 for model inputs built by the recipe, cast to the dtypes and ranks the model declares."""
    cast = cast_to_declared(contract.session, feed)
    try:
        h = contract.session.run([contract.h_name], cast)[0]
    except Exception as err:  # onnxruntime raises several unrelated types; name the model and the first line
        raise ArtifactError(f"{contract.onnx_path}: the model failed on inputs built by {contract.recipe.path} "
                            f"({str(err).splitlines()[0][:300]})") from None  # fmt: skip
    rows = len(next(iter(feed.values())))
    if h.ndim != 2 or len(h) != rows:
        raise ArtifactError(f"{contract.onnx_path}: output '{contract.h_name}' has shape {list(h.shape)} for "
                            f"{rows} users; expected (batch, d)")  # fmt: skip
    if not np.isfinite(h).all():
        raise ArtifactError(f"{contract.onnx_path}: output '{contract.h_name}' has NaN or inf")
    return h.astype(np.float32, copy=False)


@dataclass
class OnnxConfig(RecommenderConfig):
    kind: str = "sequence"
    """The recipe's kind: sequence, user_index or custom."""


def model_indices(ids: IdMap, tokens: list[str], what: str) -> np.ndarray:
    """The model's index of each dataset token (dense order); a token the model does not know is a broken run."""
    rows = [ids.position.get(token, -1) for token in tokens]
    if -1 in rows:
        missing = tokens[rows.index(-1)]
        raise ArtifactError(f"{ids.path}: the data's {what} '{missing}' is not in the model's {what} map")
    return ids.index[np.asarray(rows, dtype=np.int64)]


class OnnxRecommender(Recommender):
    """The contract of a recommender, trained elsewhere or here (`contract_export`), on a Dataset whose dense item i is
    `model_items[i]` in the model and whose dense user u is `model_users[u]` (user_index: the model's user index;
    custom: the row of the user inputs). No trainable parameters: it is evaluated and probed, never trained."""

    name = "onnx"
    config_class = OnnxConfig

    def __init__(self, contract: Contract, dataset: Dataset, name: str = "onnx") -> None:
        recipe = contract.recipe
        config = OnnxConfig(n_users=dataset.n_users, n_items=dataset.n_items, dim=contract.dim,
                            max_len=recipe.max_len, kind=recipe.kind)  # fmt: skip
        super().__init__(config)
        self.sequential = recipe.kind == "sequence"  # per instance: the recipe decides, not the class
        self.name = name  # type: ignore[misc]  # an in-house model keeps its own name (bprmf, ...) in every record
        self.contract = contract
        self.onnx_path: Path = contract.onnx_path
        self.recipe: Recipe = recipe
        self.model_items: np.ndarray = model_indices(recipe.items, dataset.item_tokens, "item")
        self.model_users: np.ndarray | None = (
            None if self.sequential or contract.users is None
            else model_indices(contract.users, dataset.user_tokens, "user")
        )  # fmt: skip
        self.embeddings: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("embeddings", torch.from_numpy(contract.items.embeddings[self.model_items]))
        bias = contract.items.bias
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias[self.model_items]))

    def feed(self, users: np.ndarray, histories: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's inputs for dense `users` (user_index, custom) or their dense-item `histories`, oldest first
        (sequence), built by the recipe."""
        if self.sequential:
            return self.recipe.sequence_inputs([self.model_items[np.asarray(h, dtype=np.int64)] for h in histories])
        assert self.model_users is not None
        rows = self.model_users[np.asarray(users, dtype=np.int64)]
        if self.recipe.kind == "user_index":
            return self.recipe.user_index_inputs(rows)
        assert self.contract.user_inputs is not None
        return {name: values[rows] for name, values in self.contract.user_inputs.items()}

    def represent(self, batch: Batch) -> torch.Tensor:
        users = batch.users.cpu().numpy()
        histories: list[np.ndarray] = []
        if self.sequential:
            # make_batch left-pads with n_items (the dataset's pad); the recipe re-pads in the model's convention.
            histories = [row[row != self.config.n_items] for row in batch.history.cpu().numpy()]
        h = run_contract(self.contract, self.feed(users, histories))
        return torch.from_numpy(h).to(batch.users.device)

    def item_embeddings(self) -> torch.Tensor:
        return self.embeddings

    def item_bias(self) -> torch.Tensor | None:
        return self.bias

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise ArtifactError("a contract is a frozen ONNX model; recsae trains only its own recommenders, in PyTorch")

    def export_module(self) -> nn.Module:
        raise ArtifactError(f"a contract is already an ONNX model ({self.onnx_path}); bundle it as is")
