"""The TopK sparse autoencoder RecSAE trains on the recommender's representation h.

Parameter names and shapes follow SAELens (`W_enc (d_in, d_sae)`, `b_enc`, `W_dec (d_sae, d_in)`, `b_dec`) and the
saved folder is a SAELens-style `cfg.json` + `sae_weights.safetensors`, so other SAE tooling can read it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from recsae_core.common.artifacts import atomic_folder, read_json, write_json
from recsae_core.common.errors import ArtifactError, ConfigError

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class SAEConfig:
    """Shape and loss of a TopK SAE; `n_latents` and `k_aux` left at 0/None are filled in from `d_in`."""

    d_in: int
    """Width of the activations (64 for the RecSAE recommenders)."""
    n_latents: int = 0
    """Dictionary size; 0 means 16 * d_in (RecSAE v2/v3)."""
    k: int = 8
    """Latents kept per sample by TopK."""
    k_aux: int | None = None
    """Dead latents the AuxK loss may use per sample; None means d_in // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss against FVU."""
    dead_after: int | None = None
    """Training samples without firing after which a latent counts as dead. None means one epoch of the training
    data (the RecSAE definition: in no top-k during the last epoch); the trainer resolves it."""

    def __post_init__(self) -> None:
        if not isinstance(self.d_in, int) or self.d_in < 1:
            raise ConfigError(f"SAEConfig.d_in must be a positive integer, got {self.d_in!r}")
        if not self.n_latents:
            self.n_latents = 16 * self.d_in
        if self.k_aux is None:
            self.k_aux = max(self.d_in // 2, 1)
        if not 1 <= self.k <= self.n_latents:
            raise ConfigError(f"SAEConfig.k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.k_aux < 1:
            raise ConfigError(f"SAEConfig.k_aux must be >= 1, got {self.k_aux}")
        if not (math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise ConfigError(f"SAEConfig.aux_coef must be finite and >= 0, got {self.aux_coef}")
        if self.dead_after is not None and self.dead_after < 1:
            raise ConfigError(f"SAEConfig.dead_after must be >= 1 or None, got {self.dead_after}")


class ForwardOutput(NamedTuple):
    """One forward pass of the SAE."""

    x_hat: Tensor
    """Reconstruction, (B, d_in)."""
    z: Tensor
    """Dense codes with at most k non-zeros per row, (B, n_latents)."""
    pre: Tensor
    """ReLU pre-activations before TopK, (B, n_latents)."""
    fvu: Tensor
    """Fraction of variance unexplained over the batch (scalar)."""
    aux_loss: Tensor
    """AuxK loss (scalar; 0 without dead latents)."""


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over the batch."""
    # A one-row or constant batch has no variance; clamping keeps the loss finite instead of NaN.
    total = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return (x_hat - x).pow(2).sum() / total


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    point = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / torch.linalg.vector_norm(x - point, dim=1).clamp_min(1e-8)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        moved = torch.linalg.vector_norm(new - point)
        point = new
        if moved < tol:
            break
    return point


class TopKSAE(nn.Module):
    """pre = relu((x - b_dec) W_enc + b_enc); z = TopK(pre, k); x_hat = z W_dec + b_dec."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        bound = 1.0 / math.sqrt(cfg.d_in)  # nn.Linear's default scale
        w_enc = (torch.rand(cfg.d_in, cfg.n_latents, generator=gen) * 2 - 1) * bound
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(w_enc.T.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.normalize_decoder()

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @torch.no_grad()
    def init_from_data(self, x: Tensor, max_rows: int = 32768) -> None:
        """Start b_dec at the geometric median of (up to max_rows of) the data, as sparsify does."""
        x = x[:max_rows].to(self.device, torch.float32)
        if len(x) == 0:
            raise ConfigError("cannot initialise the SAE from an empty activation tensor")
        self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm so latent magnitudes live in z, not in W_dec."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) row, which the next normalisation would undo anyway
        and which otherwise leaks into Adam's moment estimates."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def topk(self, pre: Tensor) -> Tensor:
        """Keep exactly the k largest entries per row (ties broken by torch.topk), zero the rest."""
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode(self, x: Tensor) -> Tensor:
        return self.topk(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """decode() for codes given as (B, m) values at (B, m) latent indices: a gather of m decoder rows per sample
        instead of a dense (B, n_latents) product, which is what makes training cheap at n_latents >> k."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, indices, values)
        x_hat = self.decode_sparse(values, indices)
        return ForwardOutput(x_hat, z, pre, fvu(x, x_hat), self._aux_loss(x, x_hat, pre, dead_mask))

    def _aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al.): dead latents alone try to explain the residual, which gives them a gradient again."""
        dead = None if dead_mask is None else torch.nonzero(dead_mask).squeeze(1)
        if dead is None or len(dead) == 0:
            return pre.new_zeros(())
        k_aux = self.cfg.k_aux or 1
        scale = min(len(dead) / k_aux, 1.0)
        # Only the dead latents should learn from this loss: the target is detached from the live reconstruction.
        residual = (x - x_hat).detach()
        values, columns = pre[:, dead].topk(min(k_aux, len(dead)), dim=-1, sorted=False)
        # No b_dec: the residual is already centred on the reconstruction.
        aux_recon = F.embedding_bag(dead[columns], self.W_dec, per_sample_weights=values, mode="sum")
        total = (residual - residual.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        return scale * (aux_recon - residual).pow(2).sum() / total

    # ---------------------------------------------------------------- saving

    def save(self, folder: Path, hook_name: str = "recommender.h") -> None:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout). The folder is replaced as a whole, in one
        rename, so a crash never leaves weights and config from different SAEs side by side."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not (folder / CFG).exists():
            raise ArtifactError(f"{folder}: exists and is not an SAE folder (no {CFG}); refusing to replace it")
        cfg = self.cfg
        sae_lens_cfg: dict[str, Any] = {
            "architecture": "topk",
            "d_in": cfg.d_in,
            "d_sae": cfg.n_latents,
            "k": cfg.k,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": cfg.k},
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "dtype": "float32",
            "device": str(self.device),
            "hook_name": hook_name,
            "model_name": "recommender",
            "hook_layer": 0,
            "hook_head_index": None,
            "context_size": 1,
            "prepend_bos": False,
            "dataset_path": "",
            "finetuning_scaling_factor": False,
            "metadata": {"hook_name": hook_name, "model_name": "recommender"},
            "recsae": asdict(cfg),
        }
        state = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in PARAMS}
        with atomic_folder(folder) as tmp:
            save_file(state, str(tmp / WEIGHTS))
            write_json(tmp / CFG, sae_lens_cfg)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> TopKSAE:
        """Read a folder written by `save` (or a SAELens TopK SAE), refusing anything inconsistent."""
        folder = Path(folder)
        cfg = _config_from_json(folder / CFG)
        path = folder / WEIGHTS
        if not path.is_file():
            raise ArtifactError(f"{path}: file not found")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{path}: cannot read weights ({err})") from None
        expected = {
            "W_enc": (cfg.d_in, cfg.n_latents),
            "b_enc": (cfg.n_latents,),
            "W_dec": (cfg.n_latents, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        if missing := sorted(set(expected) - set(state)):
            raise ArtifactError(f"{path}: missing tensors {missing}")
        for name, shape in expected.items():
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise ArtifactError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, but {folder / CFG} implies {shape}"
                )
            if not tensor.is_floating_point():
                raise ArtifactError(f"{path}: {name} has dtype {tensor.dtype}, expected a floating-point tensor")
            if not torch.isfinite(tensor).all():
                raise ArtifactError(f"{path}: {name} contains NaN or infinite values")
        sae = cls(cfg, seed=0)
        with torch.no_grad():
            for name in PARAMS:
                getattr(sae, name).copy_(state[name].to(torch.float32))
        return sae.to(device).eval()


def _config_from_json(path: Path) -> SAEConfig:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    ours = raw.get("recsae")
    try:
        if isinstance(ours, dict):
            known = {f.name for f in fields(SAEConfig)}
            if unknown := sorted(set(ours) - known):
                raise ArtifactError(f"{path}: unknown keys {unknown} under 'recsae'")
            cfg = SAEConfig(**ours)
        else:
            # A plain SAELens TopK SAE: recover what we need from its own keys.
            if raw.get("architecture", raw.get("activation_fn_str")) != "topk":
                raise ArtifactError(f"{path}: not a TopK SAE (architecture {raw.get('architecture')!r})")
            k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
            cfg = SAEConfig(d_in=int(raw["d_in"]), n_latents=int(raw["d_sae"]), k=int(k))
    except (TypeError, ValueError, KeyError, ConfigError) as err:
        raise ArtifactError(f"{path}: bad SAE config ({err})") from None
    for key, value in (("d_in", cfg.d_in), ("d_sae", cfg.n_latents)):
        if key in raw and raw[key] != value:
            raise ArtifactError(f"{path}: {key}={raw[key]!r} disagrees with the recsae block ({value})")
    return cfg
