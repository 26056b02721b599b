"""A recommender trained here, written as the contract every recommender is wrapped by: the ONNX model `inputs -> h`,
the item matrix E (+ b) and an input recipe in the dataset's own ids. From then on an in-house run is read exactly
like an imported one (`OnnxRecommender`), so probing, SAE selection, concepts, de-biasing, the bundle and the service
see one kind of recommender; the PyTorch weights stay beside it for training and its record.

The contract is checked against the PyTorch model before it is kept: h and scores of a sample of users, fed through
the recipe and ONNX Runtime, must match PyTorch's `represent` within `PARITY_TOLERANCE`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from recsae_core.common.errors import ArtifactError
from recsae_core.common.layout import CONTRACT_ITEMS, CONTRACT_ONNX, RECIPE
from recsae_core.data.datasets import Dataset
from recsae_core.data.splits import Ragged
from recsae_core.recommenders.base import Recommender
from recsae_core.recommenders.batching import make_batch
from recsae_core.recommenders.onnx_model import OnnxRecommender, read_contract
from recsae_core.recommenders.recipe import IdMap, Recipe

PARITY_TOLERANCE = 1e-5
"""Largest |h| or |score| difference accepted between two computations of one model (PyTorch and its contract; the
contract and a bundle's inputs), relative to the larger of 1 and the largest |value| compared: float32 noise grows
with the values' size, and a model trained elsewhere may emit h or scores in the thousands."""
PARITY_USERS = 512
"""Users the parity check compares (a seeded sample, or every user when there are fewer)."""
HISTORY_INPUT = "history"
"""The ONNX input name of recsae's sequence models: (B, max_len) item indices, left-padded with n_items."""
USER_INPUT = "user"
"""The ONNX input name of recsae's user-embedding models: (B,) user indices."""


def export_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    """Export `module(input) -> h` with a dynamic batch axis."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions are expected here
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["h"],
            dynamic_axes={input_name: {0: "batch"}, "h": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    module.eval()  # export restores the module's previous mode; make sure it is eval for the parity check


def dense_map(tokens: list[str], folder: Path) -> IdMap:
    """The dataset's own ids as a model id map: dense index i is row i."""
    return IdMap(folder, list(tokens), np.arange(len(tokens), dtype=np.int64), {t: i for i, t in enumerate(tokens)})


def in_house_recipe(model: Recommender, dataset: Dataset, folder: Path) -> Recipe:
    """The recipe of a model trained here: a sequence recipe (left padding with pad index n_items, as its batches)
    for sequential models, a user-index recipe otherwise; item and user maps are the dataset's dense order."""
    items = dense_map(dataset.item_tokens, folder)
    if model.sequential:
        return Recipe(path=folder / RECIPE, kind="sequence", inputs={"items": HISTORY_INPUT, "length": None},
                      items=items, max_len=model.config.max_len, pad_index=model.config.n_items,
                      padding="left")  # fmt: skip
    return Recipe(path=folder / RECIPE, kind="user_index", inputs={"user": USER_INPUT}, items=items,
                  users=dense_map(dataset.user_tokens, folder))  # fmt: skip


def contract_parity(torch_model: Recommender, contract_model: OnnxRecommender, seen: Ragged) -> dict[str, Any]:
    """`parity_figures` of PyTorch against the contract on a seeded sample of users with histories `seen`; raises
    ArtifactError past PARITY_TOLERANCE."""
    n_users = len(seen.lengths)
    users = np.sort(np.random.default_rng(0).choice(n_users, min(PARITY_USERS, n_users), replace=False))
    with torch.no_grad():
        h_torch = torch_model.represent(make_batch(torch_model, users, seen, "cpu"))
        h_onnx = contract_model.represent(make_batch(contract_model, users, seen, "cpu"))
        s_torch, s_onnx = torch_model.score(h_torch), contract_model.score(h_onnx)
    parity = {"users_checked": len(users), **parity_figures(h_onnx.numpy(), h_torch.numpy(), s_onnx.numpy(),
                                                             s_torch.numpy())}  # fmt: skip
    if past_tolerance(parity):
        raise ArtifactError(f"ONNX Runtime and PyTorch disagree beyond {PARITY_TOLERANCE} (relative to max(1, "
                            f"|value|)): {parity}")  # fmt: skip
    return parity


def parity_figures(h_ours: np.ndarray, h_theirs: np.ndarray, s_ours: np.ndarray, s_theirs: np.ndarray
                   ) -> dict[str, float]:  # fmt: skip
    """Largest absolute differences of h and of scores, and the same relative to max(1, the reference's largest
    |value|)."""
    figures = {}
    for name, ours, theirs in (("h", h_ours, h_theirs), ("score", s_ours, s_theirs)):
        diff = float(np.abs(ours - theirs).max()) if ours.size else 0.0
        scale = max(1.0, float(np.abs(theirs).max()) if theirs.size else 0.0)
        figures[f"max_abs_{name}_diff"], figures[f"max_rel_{name}_diff"] = diff, diff / scale
    return figures


def past_tolerance(parity: dict[str, float]) -> bool:
    """Whether `parity_figures` exceed PARITY_TOLERANCE."""
    return max(parity["max_rel_h_diff"], parity["max_rel_score_diff"]) > PARITY_TOLERANCE


def write_contract(model: Recommender, dataset: Dataset, seen: Ragged, folder: Path) -> dict[str, Any]:
    """Write `model` (PyTorch, trained here) into `folder` as a contract: model.onnx, items.safetensors, recipe.json
    with its maps. Returns the parity of the contract, read back from the folder, against the PyTorch model on users
    with histories `seen`. The caller makes the folder appear atomically."""
    model = model.cpu().eval()
    recipe = in_house_recipe(model, dataset, folder)
    if model.sequential:
        example = torch.full((2, model.config.max_len), model.config.n_items, dtype=torch.int64)
        example[:, -1] = torch.arange(2)
        export_onnx(model.export_module(), example, HISTORY_INPUT, folder / CONTRACT_ONNX)
    else:
        export_onnx(model.export_module(), torch.arange(2), USER_INPUT, folder / CONTRACT_ONNX)
    with torch.no_grad():
        tensors = {"item_embeddings": model.item_embeddings().detach().numpy().astype(np.float32)}
        bias = model.item_bias()
        if bias is not None:
            tensors["item_bias"] = bias.detach().numpy().astype(np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / CONTRACT_ITEMS))
    recipe.save(folder)
    contract = read_contract(folder / CONTRACT_ONNX, folder / CONTRACT_ITEMS, folder / RECIPE)
    return contract_parity(model, OnnxRecommender(contract, dataset, name=model.name), seen)
