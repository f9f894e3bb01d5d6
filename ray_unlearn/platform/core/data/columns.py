"""Feature columns that are not flat numeric columns: tensors and encoded images.

Both become the records' flat float32 features (N, D) plus a per-sample shape, validated
when the data is loaded, with every bad row named (by sample id) with what is allowed:

* a **tensor column**: ``list`` / ``large_list`` / ``fixed_size_list`` of numbers (one value
  per feature, the same length in every row), lists of such lists (an n-D tensor per row, the
  same shape in every row: ``list<list<float>>`` of 8 x 8 is shape (8, 8)), or Arrow's
  ``fixed_shape_tensor`` extension type (its declared shape);
* an **image column** (``data.image_column``): PNG or JPEG bytes, decoded by a transform
  named by import path (``data.image_transform``, ``package.module:function`` called as
  ``function(data: bytes, **data.image_transform_args)``, returning a float array of shape
  (C, H, W)); the default, :func:`decode_image`, uses Pillow and scales to [0, 1]. Every
  row must decode to the same shape.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_unlearn.platform.core.data.records import _examples

# where(mask over the table's rows) -> "sample_id 3, 7" (or "rows 3, 7"): how messages name rows
Where = Callable[[np.ndarray], str]

DEFAULT_IMAGE_TRANSFORM = "ray_unlearn.platform.core.data.columns:decode_image"
IMAGE_FORMATS = ("PNG", "JPEG")
_TENSOR_KINDS = (
    "list<float>, fixed_size_list<float>, lists of those for an n-D tensor, or fixed_shape_tensor"
)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def is_tensor_type(t: pa.DataType) -> bool:
    """A list (of lists ...) of numbers, or a fixed_shape_tensor: a tensor column."""
    if isinstance(t, pa.FixedShapeTensorType):
        return _is_numeric(t.value_type)
    if not _is_list(t):
        return False
    while _is_list(t):
        t = t.value_type
    return _is_numeric(t)


def tensor_column(
    col: pa.Array, name: str, where: Where
) -> tuple[np.ndarray | None, tuple[int, ...] | None, list[str]]:
    """(features float32 (N, D), the per-row shape, problems) of a tensor column; features
    and shape are None when there is a problem. ``shape`` has one entry per list level, or
    is the fixed_shape_tensor's declared shape."""
    label = f"features column {name!r}"
    declared: tuple[int, ...] | None = None
    if isinstance(col.type, pa.FixedShapeTensorType):
        perm = col.type.permutation
        if perm is not None and list(perm) != sorted(perm):
            return (
                None,
                None,
                [
                    f"{label}: fixed_shape_tensor with permutation {list(perm)}; "
                    "only row-major tensors (no permutation) are read"
                ],
            )
        declared = tuple(int(s) for s in col.type.shape)
        col = col.storage  # fixed_size_list<value>[prod(shape)]
    if not is_tensor_type(col.type):
        return None, None, [f"{label} must be a list of numbers ({_TENSOR_KINDS}), got {col.type}"]

    shape: list[int] = []
    arr, owner = col, np.arange(len(col))  # owner: the table row of each element of `arr`
    depth = 0
    while _is_list(arr.type):
        if arr.null_count:
            mask = np.zeros(len(col), dtype=bool)
            mask[owner[np.asarray(arr.is_null().to_numpy(zero_copy_only=False))]] = True
            what = "null rows" if depth == 0 else f"null lists at dimension {depth}"
            return None, None, [f"{label} has {what} at {where(mask)}"]
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        values, counts = np.unique(lengths, return_counts=True)
        d = int(values[np.argmax(counts)])
        if len(values) > 1:
            diff = lengths != d
            first: dict[int, int] = {}  # bad row -> its first length that differs
            for row, n in zip(owner[diff].tolist(), lengths[diff].tolist(), strict=True):
                first.setdefault(row, n)
            bad = np.zeros(len(col), dtype=bool)
            bad[list(first)] = True
            rows_lengths = [first[r] for r in sorted(first)]
            if depth == 0:
                return (
                    None,
                    None,
                    [
                        f"{label} is ragged: most rows have {d} values, but {int(bad.sum())} row(s) "
                        f"differ ({where(bad)}; lengths {_examples(rows_lengths)}); every row needs "
                        "the same length"
                    ],
                )
            return (
                None,
                None,
                [
                    f"{label} is ragged at dimension {depth}: most lists there have {d} values, but "
                    f"{int(bad.sum())} row(s) differ ({where(bad)}; lengths {_examples(rows_lengths)});"
                    f" every row must be a tensor of the same shape (so far {[*shape, d]})"
                ],
            )
        if d == 0:
            return None, None, [f"{label} has empty vectors (length 0)"]
        shape.append(d)
        owner = np.repeat(owner, lengths)
        arr = arr.flatten()
        depth += 1
    if arr.null_count:
        mask = np.zeros(len(col), dtype=bool)
        mask[owner[np.asarray(arr.is_null().to_numpy(zero_copy_only=False))]] = True
        return None, None, [f"{label} has null values inside rows at {where(mask)}"]
    flat = arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), -1)
    if declared is not None:
        if int(np.prod(declared)) != flat.shape[1]:  # an invalid extension array
            return (
                None,
                None,
                [
                    f"{label}: fixed_shape_tensor shape {list(declared)} does not match its "
                    f"{flat.shape[1]} values per row"
                ],
            )
        return flat, declared, []
    return flat, tuple(shape), []


# -- images ----------------------------------------------------------------------------------


def decode_image(data: bytes, mode: str | None = None, size: list[int] | None = None) -> np.ndarray:
    """PNG or JPEG bytes -> float32 (C, H, W) in [0, 1] (the default image transform).

    ``mode``: a Pillow mode to convert to ('L': 1 channel, 'RGB': 3, 'RGBA': 4); None keeps
    grey images grey ('1', 'L', 'I', 'I;16' -> 'L') and makes everything else RGB.
    ``size``: [H, W] to resize to (bilinear); None keeps the file's size (every row must then
    have the same size).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib, a dependency
        raise ValueError(
            "the default image decoder needs Pillow (pip install pillow), or set "
            "data.image_transform to your own decoder"
        ) from None
    with Image.open(io.BytesIO(bytes(data))) as im:
        if im.format not in IMAGE_FORMATS:
            raise ValueError(f"a {im.format} image; allowed: {', '.join(IMAGE_FORMATS)}")
        im.load()
        target = mode or ("L" if im.mode in ("1", "L", "I", "I;16") else "RGB")
        img = im.convert(target) if im.mode != target else im
        if size is not None:
            h, w = (int(s) for s in size)
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def resolve_transform(spec: str | None) -> Callable[..., Any]:
    """The decoder ``data.image_transform`` names (None: :func:`decode_image`). Raises
    ValueError naming the spec and what is allowed."""
    spec = spec or DEFAULT_IMAGE_TRANSFORM
    allowed = "an import path 'package.module:function' of a decoder (bytes, **args) -> (C, H, W)"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"data.image_transform {spec!r} is not {allowed}")
    try:
        fn: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while the module runs
        raise ValueError(
            f"data.image_transform {spec!r}: cannot import {module_name!r} "
            f"({type(e).__name__}: {e}); expected {allowed}"
        ) from None
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"data.image_transform {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"data.image_transform {spec!r} is a {type(fn).__name__}, not callable")
    return fn


def image_column(
    col: pa.Array, name: str, where: Where, transform: str | None, args: dict[str, Any]
) -> tuple[np.ndarray | None, tuple[int, ...] | None, list[str]]:
    """(features float32 (N, C*H*W), (C, H, W), problems) of a column of encoded images.

    Every row is decoded (a row that fails is named with the decoder's reason), every image
    must have the same shape and finite values."""
    label = f"image column {name!r}"
    if not (
        pa.types.is_binary(col.type)
        or pa.types.is_large_binary(col.type)
        or pa.types.is_fixed_size_binary(col.type)
    ):
        return None, None, [f"{label} must hold encoded image bytes (binary), got {col.type}"]
    if col.null_count:
        mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
        return None, None, [f"{label} has null images at {where(mask)}"]
    try:
        fn = resolve_transform(transform)
    except ValueError as e:
        return None, None, [str(e)]
    n = len(col)
    decoded: list[np.ndarray | None] = [None] * n
    failed: dict[str, list[int]] = {}  # reason -> rows
    for i, value in enumerate(col):
        try:
            arr = np.asarray(fn(value.as_py(), **args), dtype=np.float32)
            if arr.ndim < 1 or arr.size == 0:
                raise ValueError(f"the decoder returned shape {arr.shape}; expected (C, H, W)")
            decoded[i] = arr
        except Exception as e:  # any decoder error is this row's problem, reported with it
            failed.setdefault(f"{type(e).__name__}: {e}", []).append(i)
    problems = []
    for reason, rows in failed.items():
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        problems.append(
            f"{label}: {len(rows)} row(s) cannot be decoded at {where(mask)} ({reason}); allowed: "
            f"{' or '.join(IMAGE_FORMATS)} bytes for the default decoder, else what "
            "data.image_transform reads"
        )
    if problems:
        return None, None, problems
    shapes = [a.shape for a in decoded]  # type: ignore[union-attr]
    uniq, counts = np.unique(np.array([str(s) for s in shapes]), return_counts=True)
    common = shapes[[str(s) for s in shapes].index(uniq[np.argmax(counts)])]
    bad = np.array([s != common for s in shapes])
    if bad.any():
        return (
            None,
            None,
            [
                f"{label}: most images decode to shape {list(common)}, but {int(bad.sum())} row(s) "
                f"differ ({where(bad)}; shapes {_examples([list(s) for s, b in zip(shapes, bad, strict=True) if b])}); "
                "every image needs the same shape (set data.image_transform_args.size: [H, W] to "
                "resize them)"
            ],
        )
    feats = np.stack(decoded).reshape(n, -1)  # type: ignore[arg-type]
    return feats, tuple(int(s) for s in common), []
