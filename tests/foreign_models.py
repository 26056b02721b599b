"""Recommenders trained outside recsae, following conventions unlike its own, and the files a user would hand to
`recsae import`: the ONNX model, the item matrix, the recipe with the model's own id maps, the interaction log and
the item and user tables. Not a test module (no `test_` prefix); tests/test_import_contract.py uses it.

- `ForeignSeq`: a one-block causal self-attention model over item histories. Item indices are 1-based with 0 as
  padding, histories are padded on the RIGHT, the inputs are `item_seq` (B, L) and `item_seq_len` (B,), and its item
  indices are a shuffle of the catalogue (so nothing lines up with recsae's dense order by accident). E is its input
  embedding table, pad row included (row 0, which no item maps to).
- `ForeignTwoTower`: a user tower over the model's own user index (`user_idx`), user ids like "u196" in a shuffled
  order, an item tower and an item bias.

Both train for a few seconds on ML-100K (leave-one-out / random split training parts), enough to rank far better
than chance; quality beyond that does not matter here.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

from recsae_core.data.datasets import Dataset, locate_dataset
from recsae_core.data.splits import make_split

SEQ_MAX_LEN = 20
DIM = 32
UNKNOWN_ITEM = "no-such-item"
"""An item id the models never saw: rows naming it must be skipped and counted."""


@dataclass
class ForeignFiles:
    """What a user hands to `recsae import`, and the model itself to compare against."""

    folder: Path
    """Where the files are."""
    model: nn.Module
    """The trained model, in eval mode."""
    onnx: Path
    """The exported model, inputs -> h."""
    item_embeddings: Path
    """safetensors: item_embeddings [, item_bias], rows in the model's item index order."""
    recipe: Path
    """The input recipe, its maps beside it."""
    interactions: Path
    """The interaction log."""
    items: Path
    """The item table."""
    users: Path
    """The user table."""
    item_index: dict[str, int]
    """Raw item id -> the model's index (row of E)."""
    user_index: dict[str, int]
    """Raw user id -> the model's user index (two-tower only; empty for the sequence model)."""
    extra_rows: int
    """Rows added to the log that name ids the model does not know."""


class ForeignSeq(nn.Module):
    """item_seq (B, L) right-padded 1-based indices, item_seq_len (B,) -> h (B, DIM): the causal block's output at
    the last real item."""

    def __init__(self, n_items: int, dim: int = DIM, max_len: int = SEQ_MAX_LEN) -> None:
        super().__init__()
        self.max_len = max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # Small embeddings, as SASRec initialises them: with nn.Embedding's N(0, 1) the tied output layer starts with
        # logits of size ~sqrt(dim) and the model never gets past popularity (ML-100K NDCG@10 0.029 against 0.089).
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # the pad row

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Outputs at every position; position t attends to 0..t (right padding sits after every real item)."""
        length = item_seq.shape[1]
        x = self.item_emb(item_seq) + self.pos_emb(torch.arange(length, device=item_seq.device))[None]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=item_seq.device))
        attn = (q @ k.transpose(1, 2)) / math.sqrt(x.shape[-1])
        attn = attn.masked_fill(~causal[None], -1e9).softmax(-1)
        x = self.norm1(x + self.proj(attn @ v))
        return self.norm2(x + self.ff(x))

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        out = self.encode(item_seq)
        last = (item_seq_len - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return out.gather(1, last).squeeze(1)

    def item_matrix(self) -> torch.Tensor:
        return self.item_emb.weight

    def own_h(self, histories: list[list[str]], item_index: dict[str, int]) -> np.ndarray:
        """The model's own h for raw-id histories (oldest first), its inputs built its own way."""
        seq = torch.zeros((len(histories), self.max_len), dtype=torch.long)
        lengths = torch.zeros(len(histories), dtype=torch.long)
        for row, history in enumerate(histories):
            tail = [item_index[i] for i in history][-self.max_len :]
            seq[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            lengths[row] = len(tail)
        with torch.no_grad():
            return self(seq, lengths).numpy()

    def own_scores(self, histories: list[list[str]], item_index: dict[str, int]) -> np.ndarray:
        """The model's own scores over every row of E for raw-id histories."""
        with torch.no_grad():
            return self.own_h(histories, item_index) @ self.item_matrix().numpy().T


class ForeignTwoTower(nn.Module):
    """user_idx (B,) -> h (B, DIM); items through their own tower, plus a bias: scores = h E^T + b."""

    def __init__(self, n_users: int, n_items: int, dim: int = DIM) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(n_users, dim)
        self.user_tower = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.item_emb = nn.Embedding(n_items, dim)
        self.item_tower = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.item_bias = nn.Parameter(torch.zeros(n_items))

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        return self.user_tower(self.user_emb(user_idx))

    def item_matrix(self) -> torch.Tensor:
        return self.item_tower(self.item_emb.weight)

    def own_h(self, users: list[str], user_index: dict[str, int]) -> np.ndarray:
        """The model's own h for raw user ids."""
        with torch.no_grad():
            return self(torch.tensor([user_index[u] for u in users], dtype=torch.long)).numpy()

    def own_scores(self, users: list[str], user_index: dict[str, int]) -> np.ndarray:
        """The model's own scores over every item index for raw user ids."""
        with torch.no_grad():
            return self.own_h(users, user_index) @ self.item_matrix().numpy().T + self.item_bias.numpy()


def _train(model: nn.Module, loss_of, batches, epochs: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small steps run 3x faster on one thread than on two busy cores
    try:
        for _ in range(epochs):
            for batch in batches():
                optimizer.zero_grad()
                loss_of(*batch).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions are expected
        torch.onnx.export(
            module.eval(), example, str(path), input_names=names, output_names=["h"],
            dynamic_axes={**{name: {0: "batch"} for name in names}, "h": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip


def _write_map(path: Path, column: str, index: dict[str, int], order: np.ndarray) -> None:
    """An id map with rows in `order` (not index order: a map's file order is free)."""
    ids = list(index)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([column, "index"])
        writer.writerows([ids[i], index[ids[i]]] for i in order)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def log_rows(data: Dataset, user_id=str) -> list[list]:
    """The dataset's interactions as raw-id rows (user_id, item_id, timestamp, rating)."""
    return [[user_id(data.user_tokens[u]), data.item_tokens[i], int(t), 4]
            for u, i, t in zip(data.users, data.items, data.timestamps, strict=True)]  # fmt: skip


def build_sequence_model(
    data: Dataset, folder: Path, epochs: int = 4, seed: int = 0, max_len: int = SEQ_MAX_LEN, dim: int = DIM,
    lr: float = 1e-2, batch_size: int = 512,
) -> ForeignFiles:  # fmt: skip
    """Train ForeignSeq on `data`'s leave-one-out training sequences and write its import files into `folder`:
    interactions as CSV (plus rows naming an unknown item), the dataset's RecBole .item and .user tables as shipped.
    The tests use the small defaults; scripts/bench_import.py trains a SASRec-sized one (max_len 50, dim 64)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    shuffle = rng.permutation(data.n_items)
    item_index = {token: int(shuffle[d]) + 1 for d, token in enumerate(data.item_tokens)}  # 1-based, 0 = pad
    to_model = np.array([item_index[t] for t in data.item_tokens], dtype=np.int64)
    train = make_split(data, "recbole", sequential=True).train
    windows = []
    for u in range(data.n_users):
        seq = to_model[train.row(u)]
        for end in range(len(seq), 1, -max_len):
            windows.append(seq[max(0, end - max_len - 1) : end])
    inputs = torch.zeros((len(windows), max_len), dtype=torch.long)
    targets = torch.zeros_like(inputs)
    for row, window in enumerate(windows):
        inputs[row, : len(window) - 1] = torch.from_numpy(window[:-1])
        targets[row, : len(window) - 1] = torch.from_numpy(window[1:])
    model = ForeignSeq(data.n_items, dim, max_len)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model.encode(x) @ model.item_matrix().T
        return F.cross_entropy(logits[y > 0], y[y > 0])

    def batches():
        order = torch.randperm(len(inputs))
        for start in range(0, len(order), batch_size):
            yield inputs[order[start : start + batch_size]], targets[order[start : start + batch_size]]

    _train(model, loss_of, batches, epochs, lr)
    files = ForeignFiles(folder, model, folder / "seq.onnx", folder / "E.safetensors", folder / "recipe.json",
                         folder / "log.csv", folder / f"{data.name}.item", folder / f"{data.name}.user", item_index,
                         {}, extra_rows=2)  # fmt: skip
    _export(model, (inputs[:2], torch.tensor([3, 5])), ["item_seq", "item_seq_len"], files.onnx)
    with torch.no_grad():
        save_file({"item_embeddings": model.item_matrix().numpy().copy()}, str(files.item_embeddings))
    _write_map(folder / "item_map.csv", "item_id", item_index, rng.permutation(data.n_items))
    recipe = {"kind": "sequence", "inputs": {"items": "item_seq", "length": "item_seq_len"}, "max_len": max_len,
              "pad_index": 0, "padding": "right", "item_index": "item_map.csv"}  # fmt: skip
    files.recipe.write_text(json.dumps(recipe, indent=1))
    rows = log_rows(data)
    rows += [[data.user_tokens[0], UNKNOWN_ITEM, 1, 5], [data.user_tokens[1], UNKNOWN_ITEM, 2, 5]]
    _write_csv(files.interactions, ["user_id", "item_id", "timestamp", "rating"], rows)
    shipped = locate_dataset(data.name)
    shutil.copyfile(shipped / f"{data.name}.item", files.items)
    shutil.copyfile(shipped / f"{data.name}.user", files.users)
    return files


def two_tower_user(token: str) -> str:
    """The two-tower model's own user id for an ML-100K user token."""
    return f"u{token}"


def build_two_tower_model(data: Dataset, folder: Path, epochs: int = 2, seed: int = 0) -> ForeignFiles:
    """Train ForeignTwoTower on `data`'s random-split training pairs and write its import files into `folder`:
    interactions as a RecBole .inter (with its own "u.." user ids, plus a row of an unknown user), items and users
    as CSV with '|'-separated genres."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed)
    user_shuffle, item_shuffle = rng.permutation(data.n_users), rng.permutation(data.n_items)
    user_index = {two_tower_user(t): int(user_shuffle[u]) for u, t in enumerate(data.user_tokens)}
    item_index = {t: int(item_shuffle[i]) for i, t in enumerate(data.item_tokens)}
    split = make_split(data, "recbole", sequential=False)
    users = np.repeat(np.arange(data.n_users), split.train.lengths)
    pairs_u = torch.from_numpy(user_shuffle[users])
    pairs_i = torch.from_numpy(item_shuffle[split.train.values])
    model = ForeignTwoTower(data.n_users, data.n_items)

    def loss_of(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(u) @ model.item_matrix().T + model.item_bias, i)

    def batches():
        order = torch.randperm(len(pairs_u))
        for start in range(0, len(order), 2048):
            yield pairs_u[order[start : start + 2048]], pairs_i[order[start : start + 2048]]

    _train(model, loss_of, batches, epochs)
    files = ForeignFiles(folder, model, folder / "two_tower.onnx", folder / "E.safetensors", folder / "recipe.json",
                         folder / "log.inter", folder / "items.csv", folder / "users.csv", item_index, user_index,
                         extra_rows=1)  # fmt: skip
    _export(model, (torch.tensor([0, 1]),), ["user_idx"], files.onnx)
    with torch.no_grad():
        tensors = {"item_embeddings": model.item_matrix().numpy().copy(), "item_bias": model.item_bias.numpy().copy()}
    save_file(tensors, str(files.item_embeddings))
    _write_map(folder / "item_map.csv", "item_id", item_index, rng.permutation(data.n_items))
    _write_map(folder / "user_map.csv", "user_id", user_index, rng.permutation(data.n_users))
    recipe = {"kind": "user_index", "inputs": {"user": "user_idx"}, "user_index": "user_map.csv",
              "item_index": "item_map.csv"}  # fmt: skip
    files.recipe.write_text(json.dumps(recipe, indent=1))
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, t, r in log_rows(data, two_tower_user)]
    lines.append(f"u-new\t{data.item_tokens[0]}\t5\t1")
    files.interactions.write_text("\n".join(lines) + "\n")
    years = data.item_meta.years
    _write_csv(files.items, ["item_id", "title", "genres", "year"],
               [[t, data.item_meta.titles[i], "|".join(data.item_meta.genres[i]), "" if years[i] < 0 else int(years[i])]
                for i, t in enumerate(data.item_tokens)])  # fmt: skip
    meta = data.user_meta
    assert meta is not None
    _write_csv(files.users, ["user_id", "gender", "age_band"],
               [[two_tower_user(t), meta.gender[u], f"{int(meta.age[u]) // 10 * 10}s"]
                for u, t in enumerate(data.user_tokens)])  # fmt: skip
    return files
