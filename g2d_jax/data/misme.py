"""MIS-ME: soil-patch images and meteorological features, soil-moisture target.

Users bring the data (MIS-ME, Rakib et al., DSAA 2024; released with the
official code at github.com/OSU-Complex-Systems/MIS-ME, "Github Releases
v1"). The file and column names below are the ones the official code reads
(its `config.py`, `utils.py:VWC_Dataset`, `data_processor.py`); the folder
structure of the release archive itself could not be inspected here, so
every path is a config field. Layout under `root` = `<data_dir>/<subdir>`:

  images/<image>                      soil-patch photos (JPEG, e.g.
                                      OK002_20201020_120000_1.jpg: station,
                                      date, time, index)
  combined_only_train_set.xlsx        one row per image: a header row, then
  combined_only_val_set.xlsx          the columns `image` (file name in
  combined_only_test_set.xlsx         images/), `vwc` (volumetric water
                                      content, m3/m3) and the 8
                                      meteorological features
                                      air_temperature, relative_humidity,
                                      precipitation, solar_flux_density,
                                      wind_speed, barometric_pressure,
                                      tilt_north_south, tilt_west_east;
                                      other columns are ignored

The tables may also be CSV files with the same header (chosen by the file
extension). The .xlsx reader here needs no extra package: it reads the first
worksheet's cell values (shared, inline and plain strings, numbers; empty
cells are missing values). The official split has 2701 / 900 / 900 images.

Tabular modality (official preprocessing): missing values of each feature
are filled with its training-split mean, then every feature is standardised
with the training split's mean and population standard deviation
(scikit-learn's StandardScaler fitted on the filled training table; a
constant feature gets scale 1). float32 [N, 8], scale 1.0.

Image modality (official transform): RGB, PIL bilinear resize to 224 x 224
(torchvision `Resize((224, 224))`), then `(x / 255 - mean) / std` with the
dataset statistics of the official code, mean (0.507, 0.468, 0.307), std
(0.194, 0.201, 0.170), applied on read (uint8 underneath): float32
[N, 224, 224, 3]. As for CREMA-D, `storage="cache"` (default) builds the
resized images once into a memory-mapped cache, `storage="on_demand"` decodes
per read; identical values.

Target: G2D trains regression as MSE between sigmoid(output) and targets in
[0, 1] (the paper's regression loss, `losses.regression_mse`).
`target_scaling="minmax"` (default) maps VWC
affinely, y' = (y - lo) / (hi - lo), with lo, hi the training split's minimum
and maximum (or `target_min`, `target_max` if both are set); training targets
then span [0, 1] exactly, validation and test targets use the same map and
may fall slightly outside it (they are not clipped, so evaluation stays
honest). `target_scaling="none"` keeps VWC as it is (m3/m3, must lie in
[0, 1]). The map is stored in `dataset.fingerprint["target_scaling"]`;
`unscale_targets` inverts it. MAPE and R^2 (g2d_jax/regression_metrics.py)
must be computed on unscaled VWC: MAPE is not invariant to the shift.

Deviations from the official code:
- The official image branch is ImageNet-pretrained; this library trains its
  MobileNetV2 from scratch (configs/misme.py).
- The official target is raw VWC with a linear output; G2D's regression
  uses the [0, 1] scaling above.
- A table row whose image file is missing raises DataError (the official
  loader would fail when reading it); `skip_missing_images=True` drops it.
- The official code also evaluates per-station test tables (OK001/2/3);
  point `test_table` at one of them to do so.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import materialize
from g2d_jax.data import media

NAME = "misme"
RECIPE_VERSION = 1
MODALITIES = ("image", "tabular")
FEATURE_COLUMNS = ("air_temperature", "relative_humidity", "precipitation",
                   "solar_flux_density", "wind_speed", "barometric_pressure",
                   "tilt_north_south", "tilt_west_east")
IMAGE_MEAN = (0.507, 0.468, 0.307)
IMAGE_STD = (0.194, 0.201, 0.170)
SCALINGS = ("minmax", "none")
TABLE_FIELDS = {"train": "train_table", "val": "val_table",
                "test": "test_table"}

NON_BUILD_FIELDS = base.LOCATION_FIELDS + ("image_dir", "train_table",
                                           "val_table", "test_table")

_XLSX_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_XLSX_REL = ("http://schemas.openxmlformats.org/officeDocument/2006/"
             "relationships")
_PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"


def default_config() -> ml_collections.ConfigDict:
  """Settings of the MIS-ME loader (official preprocessing by default)."""
  cfg = base.user_data_config(NAME)
  # Image folder and split tables (.xlsx or .csv), relative to
  # <data_dir>/<subdir> or absolute.
  cfg.image_dir = "images"
  cfg.train_table = "combined_only_train_set.xlsx"
  cfg.val_table = "combined_only_val_set.xlsx"
  cfg.test_table = "combined_only_test_set.xlsx"
  # Column names (official config.py).
  cfg.image_column = "image"
  cfg.target_column = "vwc"
  cfg.feature_columns = FEATURE_COLUMNS
  cfg.image_size = 224
  cfg.skip_missing_images = False
  # Target map to [0, 1]: "minmax" (train min/max, or target_min/max if both
  # are set) or "none" (VWC as is).
  cfg.target_scaling = "minmax"
  cfg.target_min = ml_collections.FieldReference(None, field_type=float)
  cfg.target_max = ml_collections.FieldReference(None, field_type=float)
  return cfg


# ----------------------------------------------------------------------------
# Tables.


def _col_index(ref: str) -> int:
  letters = re.match(r"[A-Z]+", ref.upper())
  if not letters:
    raise ValueError(f"bad cell reference {ref!r}")
  n = 0
  for ch in letters.group(0):
    n = n * 26 + (ord(ch) - ord("A") + 1)
  return n - 1


def _first_sheet(z: zipfile.ZipFile) -> str:
  """Archive path of the workbook's first worksheet."""
  names = set(z.namelist())
  try:
    wb = ET.fromstring(z.read("xl/workbook.xml"))
    sheet = wb.find(f"{{{_XLSX_MAIN}}}sheets/{{{_XLSX_MAIN}}}sheet")
    rid = sheet.get(f"{{{_XLSX_REL}}}id")
    rels = ET.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    for rel in rels.iter(f"{{{_PKG_REL}}}Relationship"):
      if rel.get("Id") == rid:
        target = rel.get("Target")
        path = (target.lstrip("/") if target.startswith("/")
                else "xl/" + target)
        if path in names:
          return path
  except (KeyError, AttributeError, ET.ParseError):
    pass
  if "xl/worksheets/sheet1.xml" in names:
    return "xl/worksheets/sheet1.xml"
  raise ValueError("no worksheet found")


def read_xlsx(path: str) -> list[list[Any]]:
  """Cell values of the first worksheet of an .xlsx file, row by row.

  Strings (shared, inline, formula results) are str, numbers and booleans
  float, empty or error cells None. Gaps between cells are None.

  Raises:
    DataError: the file is not a readable .xlsx workbook.
  """
  m = f"{{{_XLSX_MAIN}}}"
  try:
    with zipfile.ZipFile(path) as z:
      shared = []
      if "xl/sharedStrings.xml" in z.namelist():
        for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(
            f"{m}si"):
          shared.append("".join(t.text or "" for t in si.iter(f"{m}t")))
      sheet = ET.fromstring(z.read(_first_sheet(z)))
      rows: list[list[Any]] = []
      for row in sheet.iter(f"{m}row"):
        cells, col = {}, 0
        for c in row.findall(f"{m}c"):
          col = _col_index(c.get("r")) if c.get("r") else col
          kind, v = c.get("t", "n"), c.find(f"{m}v")
          text = v.text if v is not None else None
          if kind == "s":
            value = shared[int(text)] if text is not None else None
          elif kind == "inlineStr":
            node = c.find(f"{m}is")
            value = ("".join(t.text or "" for t in node.iter(f"{m}t"))
                     if node is not None else None)
          elif kind == "str":
            value = text
          elif kind == "e":
            value = None
          else:  # "n", "b", "d" (ISO dates are left as text)
            value = (None if text in (None, "") else
                     text if kind == "d" else float(text))
          cells[col] = value
          col += 1
        r = int(row.get("r")) - 1 if row.get("r") else len(rows)
        rows.extend([] for _ in range(r - len(rows)))
        width = max(cells) + 1 if cells else 0
        rows.append([cells.get(i) for i in range(width)])
      return rows
  except (zipfile.BadZipFile, KeyError, ValueError, IndexError,
          ET.ParseError, OSError) as e:
    raise errors.DataError(
        f"{path} is not a readable .xlsx workbook ({e}); re-export it from a"
        " spreadsheet program, or save it as CSV with the same header and"
        " point the config at the .csv") from None


def read_table(path: str) -> tuple[list[str], list[list[Any]]]:
  """(header, data rows) of a .xlsx or .csv table; empty rows are skipped.

  Raises:
    DataError: missing, unreadable, no header, or an unknown extension.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is an MIS-ME split table (official"
        " combined_only_{train,val,test}_set.xlsx); put it there or set"
        " config.data.train_table / val_table / test_table")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".xlsx":
    rows = read_xlsx(path)
  elif ext == ".csv":
    with open(path, encoding="utf-8-sig", newline="") as f:
      rows = [list(r) for r in csv.reader(f)]
  else:
    raise errors.DataError(
        f"{path}: unknown table type {ext!r}; use .xlsx or .csv")
  rows = [r for r in rows if any(v not in (None, "") for v in r)]
  if not rows:
    raise errors.DataError(f"{path} is empty; it needs a header row")
  header = ["" if v is None else str(v).strip() for v in rows[0]]
  return header, rows[1:]


def _number(value: Any) -> float:
  """A cell value as float; empty cells and NaN spellings are NaN."""
  if value is None:
    return math.nan
  if isinstance(value, float):
    return value
  text = str(value).strip()
  if text == "" or text.lower() in ("nan", "na", "null", "none"):
    return math.nan
  return float(text)


def parse_table(path: str, cfg) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(image names, float64 features [N, F] with NaN gaps, targets [N]).

  Raises:
    DataError: a required column is missing, a value is not a number, or a
      target is missing.
  """
  header, rows = read_table(path)
  features = tuple(cfg.feature_columns)
  needed = (cfg.image_column, cfg.target_column) + features
  missing = [c for c in needed if c not in header]
  if missing:
    raise errors.DataError(
        f"{path} lacks the column(s) {missing} (it has {header}); the MIS-ME"
        " tables need image, vwc and the meteorological features, or set"
        " config.data.image_column / target_column / feature_columns")
  col = {c: header.index(c) for c in needed}
  names, feats, targets = [], [], []
  for line, row in enumerate(rows, start=2):
    row = list(row) + [None] * (len(header) - len(row))
    name = row[col[cfg.image_column]]
    if name in (None, ""):
      raise errors.DataError(f"{path} row {line}: no image file name")
    names.append(str(name).strip())
    try:
      feats.append([_number(row[col[c]]) for c in features])
      targets.append(_number(row[col[cfg.target_column]]))
    except ValueError as e:
      raise errors.DataError(
          f"{path} row {line}: a feature or target is not a number ({e})"
      ) from None
    if not math.isfinite(targets[-1]):
      raise errors.DataError(
          f"{path} row {line} ({names[-1]}): the target"
          f" {cfg.target_column!r} is missing or not finite; fix or remove"
          " the row")
  if not names:
    raise errors.DataError(f"{path} has a header but no rows")
  return (names, np.array(feats, np.float64).reshape(len(names), -1),
          np.array(targets, np.float64))


def fit_standardizer(train: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                  np.ndarray]:
  """(fill values, mean, scale) of the official NaN fill + StandardScaler."""
  fill = np.nanmean(np.where(np.isfinite(train), train, np.nan), axis=0)
  if np.any(~np.isfinite(fill)):
    bad = np.flatnonzero(~np.isfinite(fill)).tolist()
    raise errors.DataError(
        f"training features {bad} (0-based, in config.data.feature_columns"
        " order) have no finite value; fix the training table")
  filled = np.where(np.isfinite(train), train, fill)
  mean, std = filled.mean(axis=0), filled.std(axis=0)
  return fill, mean, np.where(std > 0, std, 1.0)


def apply_standardizer(x: np.ndarray, fill: np.ndarray, mean: np.ndarray,
                       scale: np.ndarray) -> np.ndarray:
  """Fills NaN with `fill`, then standardises: float32 (x - mean) / scale."""
  return ((np.where(np.isfinite(x), x, fill) - mean) / scale).astype(
      np.float32)


def target_map(train_targets: np.ndarray, cfg) -> tuple[float, float]:
  """(lo, hi) of the target scaling y' = (y - lo) / (hi - lo)."""
  if cfg.target_scaling == "none":
    return 0.0, 1.0
  if cfg.target_min is not None and cfg.target_max is not None:
    lo, hi = float(cfg.target_min), float(cfg.target_max)
  else:
    lo, hi = float(train_targets.min()), float(train_targets.max())
  if not hi > lo:
    raise errors.DataError(
        f"target scaling range [{lo}, {hi}] is empty (all training targets"
        " are equal?); set config.data.target_min and target_max")
  return lo, hi


def unscale_targets(values, dataset_or_fingerprint) -> np.ndarray:
  """Maps scaled targets or predictions back to VWC (m3/m3).

  Args:
    values: scaled values (labels, or sigmoid outputs of the model).
    dataset_or_fingerprint: the MIS-ME `MultimodalDataset` or its
      fingerprint dict.
  """
  fp = getattr(dataset_or_fingerprint, "fingerprint", dataset_or_fingerprint)
  scaling = fp["target_scaling"]
  lo, hi = scaling["min"], scaling["max"]
  return np.asarray(values, np.float64) * (hi - lo) + lo


# ----------------------------------------------------------------------------
# Loader.


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  base.check_common_config(cfg)
  if cfg.target_scaling not in SCALINGS:
    raise errors.ConfigError(
        f"config.data.target_scaling={cfg.target_scaling!r} must be one of"
        f" {SCALINGS}")
  if (cfg.target_min is None) != (cfg.target_max is None):
    raise errors.ConfigError(
        "set both config.data.target_min and target_max, or neither (then"
        " the training split's range is used)")
  if not tuple(cfg.feature_columns):
    raise errors.ConfigError("config.data.feature_columns is empty")


def load(cfg) -> base.MultimodalDataset:
  """Loads MIS-ME (see the module docstring for layout and preprocessing).

  Raises:
    ConfigError: a bad setting.
    DataError: missing or malformed tables or images.
  """
  validate_config(cfg)
  root = base.dataset_root(cfg, "MIS-ME",
                           "the images folder and the split tables")
  image_dir = base.media_folder(root, cfg, "image_dir", "MIS-ME image")
  h = hashlib.sha256()
  tables = {}
  for s, field in TABLE_FIELDS.items():
    path = base.resolve_path(root, cfg[field])
    names, feats, targets = parse_table(path, cfg)
    h.update(base.file_identity(path, root).encode())
    keep = []
    for i, name in enumerate(names):
      p = os.path.join(image_dir, name)
      if os.path.exists(p):
        keep.append(i)
        h.update(base.file_identity(p, root).encode())
      elif not cfg.skip_missing_images:
        raise errors.DataError(
            f"{path}: image {p} is missing; restore it, or set"
            " config.data.skip_missing_images=True to drop such rows")
    if len(keep) < len(names):
      logging.info("MIS-ME %s: dropped %d rows without an image", s,
                   len(names) - len(keep))
    if not keep:
      raise errors.DataError(f"{path}: no row has its image in {image_dir}")
    tables[s] = ([names[i] for i in keep], feats[keep], targets[keep])

  fill, mean, scale = fit_standardizer(tables["train"][1])
  lo, hi = target_map(tables["train"][2], cfg)
  if cfg.target_scaling == "none":
    for s, (_, _, y) in tables.items():
      if y.min() < 0 or y.max() > 1:
        raise errors.DataError(
            f"{s} targets span [{y.min()}, {y.max()}], outside [0, 1];"
            " use config.data.target_scaling='minmax'")
  plans, tabular = {}, {}
  for s in base.SPLIT_NAMES:
    names, feats, targets = tables[s]
    n = len(base.cap(names, cfg.max_examples_per_split))
    paths = [os.path.join(image_dir, x) for x in names[:n]]
    tabular[s] = apply_standardizer(feats[:n], fill, mean, scale)
    plans[s] = materialize.SplitPlan(
        readers={"image": materialize.Reader(
            lambda i, paths=paths: media.load_rgb(paths[i], cfg.image_size),
            (cfg.image_size, cfg.image_size, 3), "uint8")},
        labels=((targets[:n] - lo) / (hi - lo)).astype(np.float32),
        ids=names[:n])
  settings = base.build_settings(cfg, NON_BUILD_FIELDS, RECIPE_VERSION)
  arrays, key = materialize.materialize(
      NAME, plans, storage=cfg.storage, cache_dir=cfg.cache_dir,
      settings=settings, sources=h.hexdigest(), task="regression",
      build_threads=cfg.build_threads)
  splits = {
      s: base.Split(
          inputs={"image": media.NormalizedImages(arrays[s]["image"],
                                                   IMAGE_MEAN, IMAGE_STD),
                  "tabular": tabular[s]},
          labels=plans[s].labels, scales={"image": 1.0, "tabular": 1.0})
      for s in base.SPLIT_NAMES}
  fingerprint = base.make_fingerprint(NAME, settings, splits, "regression")
  fingerprint["sources"] = h.hexdigest()
  fingerprint["build_key"] = key
  fingerprint["target_scaling"] = {"kind": cfg.target_scaling, "min": lo,
                                   "max": hi}
  fingerprint["tabular_standardizer"] = {
      "fill": fill.tolist(), "mean": mean.tolist(), "scale": scale.tolist()}
  return base.MultimodalDataset(
      name=NAME, modalities=MODALITIES, splits=splits, num_classes=1,
      task="regression", fingerprint=fingerprint)
