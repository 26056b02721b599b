"""Opening ONNX models and feeding them inputs from safetensors files, checked against the model's signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors import SafetensorError
from safetensors.numpy import load_file

from recsae_core.common.errors import ArtifactError


def h_output(session: ort.InferenceSession, path: Path, name: str | None = None) -> str:
    """The output that carries h: the one named `name`, else 'h', else the only/first output."""
    outputs = [o.name for o in session.get_outputs()]
    chosen = name or ("h" if "h" in outputs else outputs[0])
    if chosen not in outputs:
        raise ArtifactError(f"{path}: no output named '{chosen}'; outputs are {outputs}")
    return chosen


def open_onnx(path: Path, threads: int = 0) -> ort.InferenceSession:
    if not path.is_file():
        raise ArtifactError(f"{path}: ONNX model not found")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises several unrelated exception types for bad files
        raise ArtifactError(f"{path}: not a loadable ONNX model ({str(err).splitlines()[0][:200]})") from None


ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


def load_inputs(path: Path, session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Model inputs from a safetensors file, checked against the session's input names, dtypes and batch sizes."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ArtifactError(f"{path}: cannot read inputs ({err})") from None
    wanted = {i.name: i for i in session.get_inputs()}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ArtifactError(f"{path}: lacks model input(s) {missing}; it has {sorted(tensors)}")
    out = {}
    for name, spec in wanted.items():
        dtype = ORT_TO_NUMPY.get(spec.type)
        if dtype is None:
            raise ArtifactError(
                f"{path}: model input '{name}' has type {spec.type}, which recsae cannot feed "
                f"(supported: {', '.join(sorted(ORT_TO_NUMPY))})"
            )
        values = tensors[name]
        expected = list(spec.shape)
        fixed = [(axis, dim) for axis, dim in enumerate(expected) if isinstance(dim, int) and axis > 0]
        if values.ndim != len(expected) or any(values.shape[axis] != dim for axis, dim in fixed):
            raise ArtifactError(f"{path}: '{name}' has shape {list(values.shape)}; the model expects {expected}")
        out[name] = values.astype(dtype, copy=False)
    sizes = {name: len(v) for name, v in out.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ArtifactError(f"{path}: inputs must share a non-empty first axis; got {sizes}")
    return out


def cast_to_declared(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs in the dtypes and ranks the model declares: a recipe builds int64 vectors, while a model may take int32,
    or lengths as (batch, 1)."""
    specs = {spec.name: spec for spec in session.get_inputs()}
    out = {}
    for name, values in feed.items():
        spec = specs[name]
        values = np.ascontiguousarray(values, dtype=ORT_TO_NUMPY.get(spec.type, values.dtype))
        out[name] = values[:, None] if len(spec.shape) == 2 and values.ndim == 1 else values
    return out
