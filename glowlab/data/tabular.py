"""User-supplied tabular vectors for the density lab: loading with clear errors, splitting, scaling.

Accepted files (read only, never written):

- ``.npz``: either split arrays named ``train`` / ``val`` / ``test`` (any subset that includes
  ``train``; other arrays in the file are then ignored), or one array to split later, named ``x``
  or being the file's only array, returned as ``{"all": x}``.
- ``.csv`` / ``.txt``: comma separated numbers, one vector per line, returned as ``{"all": x}``.
  Blank lines are skipped. The first line is a header, and skipped, when none of its fields is a
  number; a first line mixing names and numbers is an error.

Every array must be 2-D (N, D) with N, D >= 1, numeric, and finite once converted to float32; all
splits must share D. Errors are ``DataError`` (a ``ValueError``) or ``FileNotFoundError`` and name
the file, plus the array name (npz) or line number (csv).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from glowlab.data.shards import DataError
from glowlab.data.toy import TOY_DATASETS, toy_splits

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".csv", ".txt")
NPZ_SUFFIXES = (".npz",)


def _checked(path: Path, where: str, array: np.ndarray) -> np.ndarray:
    """``array`` as float32 (N, D), or a DataError naming ``path`` and ``where``."""
    if array.ndim != 2:
        raise DataError(f"{path}: {where} must be a 2-D (N, D) array, got shape {array.shape}")
    if array.size == 0:
        raise DataError(f"{path}: {where} is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) and array.dtype != bool:
        raise DataError(f"{path}: {where} must hold real numbers, got dtype {array.dtype}")
    # Checked after the cast, so float64 values too large for float32 are caught as well.
    with np.errstate(over="ignore"):
        vectors = array.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{path}: {where} has {rows.size} row(s) with NaN or inf values (first: row {rows[0]})")
    return vectors


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from error
    with npz:
        names = list(npz.files)
        present = [name for name in SPLITS if name in names]
        if present:
            if "train" not in present:
                raise DataError(f"{path}: has split array(s) {', '.join(present)} but no 'train' array")
            chosen = {name: name for name in present}
        elif "x" in names:
            chosen = {"all": "x"}
        elif len(names) == 1:
            chosen = {"all": names[0]}
        else:
            raise DataError(
                f"{path}: expected arrays 'train'/'val'/'test', an array 'x', or a single array; "
                f"found: {', '.join(names) or 'nothing'}"
            )
        splits = {}
        for split, key in chosen.items():
            try:
                array = npz[key]
            except ValueError as error:  # object arrays need pickle, which we refuse
                raise DataError(f"{path}: array {key!r} could not be read as numbers ({error})") from error
            splits[split] = _checked(path, f"array {key!r}", array)
    return splits


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _load_text(path: Path) -> dict[str, np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    width = None
    first = True
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if first:
            first = False
            if not any(_is_number(field) for field in fields):
                continue
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            raise DataError(f"{path}: line {number} has {len(fields)} values, earlier lines have {width}")
        try:
            rows.append([float(field) for field in fields])
        except ValueError:
            column, field = next((i, f) for i, f in enumerate(fields, start=1) if not _is_number(f))
            raise DataError(f"{path}: line {number}, column {column}: {field!r} is not a number") from None
        line_numbers.append(number)
    if not rows:
        raise DataError(f"{path}: no data rows")
    with np.errstate(over="ignore"):
        vectors = np.asarray(rows, dtype=np.float64).astype(np.float32)  # (N, D)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: line {line_numbers[bad[0]]} has a NaN or inf value ({bad.size} such line(s))")
    return {"all": _checked(path, "the data", vectors)}


def load_vectors(path: str | Path) -> dict[str, np.ndarray]:
    """Float32 (N, D) vectors from an ``.npz`` or ``.csv``/``.txt`` file, keyed by split name.

    Predefined splits come back as ``train`` (and ``val`` / ``test`` where present); a single
    array as ``all`` (see ``split_vectors``). See the module docstring for the accepted layouts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in NPZ_SUFFIXES:
        splits = _load_npz(path)
    elif suffix in TEXT_SUFFIXES:
        splits = _load_text(path)
    else:
        raise DataError(
            f"{path}: unknown extension {path.suffix!r}; expected one of: {', '.join(NPZ_SUFFIXES + TEXT_SUFFIXES)}"
        )
    dims = {name: array.shape[1] for name, array in splits.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"{path}: splits differ in dimension: {', '.join(f'{k}={v}' for k, v in dims.items())}")
    return splits


def split_vectors(x: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Shuffle the rows of ``x`` with ``seed`` and cut them into train/val/test by ``fractions``.

    ``fractions`` (three non-negative numbers summing to 1) give val and test
    ``round(fraction * N)`` rows each and train the rest; a split that gets no rows is left out.
    Deterministic for a given seed and N.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"split_vectors expects an (N, D) array, got shape {x.shape}")
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    n = x.shape[0]
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} rows leave no training rows with fractions {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    splits = {name: x[order[bounds[i] : bounds[i + 1]]] for i, name in enumerate(SPLITS)}
    return {name: rows for name, rows in splits.items() if len(rows)}


def standardise(
    splits: dict[str, np.ndarray], min_std: float = 1e-6
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Shift and scale every split by the ``train`` split's per-column mean and std.

    Only train statistics are used, so val/test stay unseen. ``std`` is the population standard
    deviation, raised to at least ``min_std`` so constant columns do not divide by zero. Returns
    ``(scaled splits, mean, std)``, the latter two float32 of shape (D,). A density fitted to the
    scaled data gives log p(x) = log p_scaled((x - mean) / std) - sum(log std) in the original units.
    """
    if "train" not in splits:
        raise ValueError(f"standardise needs a 'train' split, got: {', '.join(splits) or 'none'}")
    train = np.asarray(splits["train"], dtype=np.float64)
    if train.ndim != 2 or train.shape[0] == 0:
        raise ValueError(f"the train split must be a non-empty (N, D) array, got shape {train.shape}")
    mean = train.mean(axis=0)
    std = np.maximum(train.std(axis=0), min_std)
    scaled = {name: ((np.asarray(rows, np.float64) - mean) / std).astype(np.float32) for name, rows in splits.items()}
    return scaled, mean.astype(np.float32), std.astype(np.float32)


def load_vector_splits(
    source: str, n_train: int, n_val: int, n_test: int, seed: int
) -> tuple[dict[str, np.ndarray], str]:
    """Train/val/test arrays of a toy data set (by name) or of a user's ``.npz``/``.csv`` file.

    Files with ``train``/``val``/``test`` arrays keep their splits (a missing ``val`` or ``test`` is
    carved out of ``train``); a single array is split 80/10/10 with ``seed``. Returns the splits and
    a short name for the data set.
    """
    if source in TOY_DATASETS:
        return toy_splits(source, n_train, n_val, n_test, seed), source
    path = Path(source)
    if path.suffix.lower() not in (".npz", ".csv", ".txt"):
        raise ValueError(
            f"data.source={source!r} is neither a toy data set ({', '.join(TOY_DATASETS)}) nor a .npz/.csv/.txt file"
        )
    arrays = load_vectors(path)
    if "all" in arrays:
        splits = split_vectors(arrays["all"], seed=seed)
    else:
        if "train" not in arrays:
            raise ValueError(f"{path}: has splits {sorted(arrays)} but no 'train'")
        splits = dict(arrays)
        for missing in ("val", "test"):
            if missing not in splits:
                carved = split_vectors(splits["train"], fractions=(0.9, 0.1, 0.0), seed=seed)
                splits["train"], splits[missing] = carved["train"], carved["val"]
    return splits, path.stem
