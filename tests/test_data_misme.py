"""Tests of the MIS-ME loader on a small fixture in the official layout.

The fixture (written into tmp_path) is made up for these tests: flat-colour
JPEGs under MIS-ME-style file names and hand-written .xlsx / .csv split
tables with the official columns. It is not MIS-ME data.
"""

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from g2d_jax import data
from g2d_jax import errors
from g2d_jax import regression_metrics
from g2d_jax.data import misme
from tests import pipeline_fixtures as fx

FEATS = misme.FEATURE_COLUMNS
# Column order differs from FEATURE_COLUMNS and has extra columns.
HEADER = ["date", "image", *FEATS[::-1], "vwc", "station"]
NAN = float("nan")


def _rows(split, vwcs, nan_at=None):
  rng = np.random.default_rng(len(vwcs) + len(split))
  rows = []
  for i, v in enumerate(vwcs):
    feats = rng.normal(size=len(FEATS)) * np.arange(1, len(FEATS) + 1) + 10
    if nan_at is not None and i == nan_at[0]:
      feats[nan_at[1]] = NAN
    hour = {"train": 12, "val": 13, "test": 14}[split]
    name = f"OK00{1 + i % 3}_2020{10 + i:02d}02_{hour}0000_{i}.jpg"
    rows.append({"name": name, "feats": feats, "vwc": v, "split": split})
  return rows


TRAIN = _rows("train", [0.15, 0.32, 0.21, 0.18, 0.27, 0.24],
              nan_at=(2, 1))
VAL = _rows("val", [0.19, 0.35, 0.22], nan_at=(0, 4))
TEST = _rows("test", [0.16, 0.30, 0.2, 0.25])


def _col(i):
  return chr(ord("A") + i)


def _write_xlsx(path, table):
  """A minimal valid .xlsx (OOXML) workbook with one worksheet.

  Strings go to the shared-string table except `("inline", s)` cells;
  None cells are omitted (empty).
  """
  shared, index, xml_rows = [], {}, []
  for r, row in enumerate(table, start=1):
    cells = []
    for c, v in enumerate(row):
      ref = f"{_col(c)}{r}"
      if v is None or (isinstance(v, float) and np.isnan(v)):
        continue
      if isinstance(v, tuple):
        cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{v[1]}</t></is>'
                     "</c>")
      elif isinstance(v, str):
        if v not in index:
          index[v] = len(shared)
          shared.append(v)
        cells.append(f'<c r="{ref}" t="s"><v>{index[v]}</v></c>')
      else:
        cells.append(f'<c r="{ref}"><v>{float(v)!r}</v></c>')
    xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
  main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
  rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
  parts = {
      "[Content_Types].xml": (
          '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas'
          '.openxmlformats.org/package/2006/content-types"><Default Extension'
          '="rels" ContentType="application/vnd.openxmlformats-package.'
          'relationships+xml"/><Default Extension="xml" ContentType="'
          'application/xml"/><Override PartName="/xl/workbook.xml" '
          'ContentType="application/vnd.openxmlformats-officedocument.'
          'spreadsheetml.sheet.main+xml"/><Override PartName="/xl/worksheets/'
          'sheet1.xml" ContentType="application/vnd.openxmlformats-'
          'officedocument.spreadsheetml.worksheet+xml"/><Override PartName="/'
          'xl/sharedStrings.xml" ContentType="application/vnd.openxmlformats-'
          'officedocument.spreadsheetml.sharedStrings+xml"/></Types>'),
      "_rels/.rels": (
          f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}">'
          f'<Relationship Id="rId1" Type="{rel}/officeDocument" '
          'Target="xl/workbook.xml"/></Relationships>'),
      "xl/workbook.xml": (
          f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{main}" '
          f'xmlns:r="{rel}"><sheets><sheet name="Sheet1" sheetId="1" '
          'r:id="rId1"/></sheets></workbook>'),
      "xl/_rels/workbook.xml.rels": (
          f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}">'
          f'<Relationship Id="rId1" Type="{rel}/worksheet" '
          'Target="worksheets/sheet1.xml"/><Relationship Id="rId2" '
          f'Type="{rel}/sharedStrings" Target="sharedStrings.xml"/>'
          "</Relationships>"),
      "xl/worksheets/sheet1.xml": (
          f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{main}">'
          f'<sheetData>{"".join(xml_rows)}</sheetData></worksheet>'),
      "xl/sharedStrings.xml": (
          f'<?xml version="1.0" encoding="UTF-8"?><sst xmlns="{main}" '
          f'count="{len(shared)}" uniqueCount="{len(shared)}">'
          + "".join(f"<si><t>{s}</t></si>" for s in shared) + "</sst>"),
  }
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for name, text in parts.items():
      z.writestr(name, text)


def _table(rows, inline_first=False):
  out = [list(HEADER)]
  for k, r in enumerate(rows):
    by_name = dict(zip(FEATS, r["feats"]))
    name = ("inline", r["name"]) if (inline_first and k == 0) else r["name"]
    out.append(["2020-10-02", name, *[by_name[f] for f in FEATS[::-1]],
                r["vwc"], r["name"][:5]])
  return out


def _write_fixture(root):
  os.makedirs(os.path.join(root, "images"))
  for k, r in enumerate(TRAIN + VAL + TEST):
    img = np.zeros((30, 40, 3), np.uint8)
    img[...] = (30 + 7 * k, 200 - 5 * k, 90 + 3 * k)
    Image.fromarray(img).save(os.path.join(root, "images", r["name"]),
                              quality=95)
  _write_xlsx(os.path.join(root, "combined_only_train_set.xlsx"),
              _table(TRAIN, inline_first=True))
  _write_xlsx(os.path.join(root, "combined_only_test_set.xlsx"), _table(TEST))
  with open(os.path.join(root, "combined_only_val_set.csv"), "w") as f:
    for row in _table(VAL):
      f.write(",".join("" if isinstance(v, float) and np.isnan(v) else str(v)
                       for v in row) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  _write_fixture(str(d / "misme"))
  return str(d)


def _cfg(data_dir, cache_dir="", **kw):
  return fx.data_config("misme", data_dir, cache_dir, **{
      "val_table": "combined_only_val_set.csv", "image_size": 32, **kw})


@pytest.fixture(scope="module")
def dataset(data_dir, tmp_path_factory):
  return data.load_dataset(_cfg(data_dir, tmp_path_factory.mktemp("cache")))


def test_read_xlsx_cells(data_dir):
  rows = misme.read_xlsx(os.path.join(data_dir, "misme",
                                      "combined_only_train_set.xlsx"))
  assert rows[0] == HEADER
  assert rows[1][1] == TRAIN[0]["name"]        # inline string
  assert rows[3][HEADER.index(FEATS[1])] is None   # the empty cell
  assert rows[2][HEADER.index("vwc")] == 0.32


def test_shapes_targets_and_tabular_preprocessing(dataset):
  ds = dataset
  assert ds.name == "misme" and ds.task == "regression"
  assert ds.num_classes == 1 and ds.modalities == ("image", "tabular")
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 6, "val": 3, "test": 4}
  # Independent reference of the official preprocessing.
  train = np.array([r["feats"] for r in TRAIN])
  fill = np.nanmean(train, axis=0)
  filled = np.where(np.isnan(train), fill, train)
  mean, std = filled.mean(axis=0), filled.std(axis=0)
  lo, hi = 0.15, 0.32
  for s, rows in (("train", TRAIN), ("val", VAL), ("test", TEST)):
    split = ds.splits[s]
    x = np.array([r["feats"] for r in rows])
    want = (np.where(np.isnan(x), fill, x) - mean) / std
    np.testing.assert_allclose(split.inputs["tabular"], want, rtol=1e-5,
                               atol=1e-6)
    assert split.inputs["tabular"].dtype == np.float32
    vwc = np.array([r["vwc"] for r in rows])
    np.testing.assert_allclose(split.labels, (vwc - lo) / (hi - lo),
                               rtol=1e-6)
    assert split.labels.dtype == np.float32
    np.testing.assert_allclose(misme.unscale_targets(split.labels, ds), vwc,
                               rtol=1e-6)
    b = split.batch(np.arange(len(split)))
    assert b["image"].shape == (len(split), 32, 32, 3)
    assert b["tabular"].shape == (len(split), 8)
  assert ds.splits["train"].labels.min() == 0.0
  assert ds.splits["train"].labels.max() == 1.0
  # Not clipped: a validation VWC above the training maximum.
  assert ds.splits["val"].labels.max() == pytest.approx((0.35 - lo) / 0.17)
  assert ds.fingerprint["target_scaling"] == {"kind": "minmax", "min": lo,
                                              "max": hi}


def test_image_normalisation(dataset):
  mean = np.array(misme.IMAGE_MEAN, np.float32)
  std = np.array(misme.IMAGE_STD, np.float32)
  for s in ("train", "val", "test"):
    split = dataset.splits[s]
    raw = split.inputs["image"].raw
    offset = {"train": 0, "val": len(TRAIN), "test": len(TRAIN) + len(VAL)}[s]
    for i in range(len(split)):
      j = offset + i
      np.testing.assert_allclose(raw[i].reshape(-1, 3).mean(axis=0),
                                 (30 + 7 * j, 200 - 5 * j, 90 + 3 * j),
                                 atol=1.5)
    np.testing.assert_allclose(
        split.batch(np.arange(len(split)))["image"],
        (raw[:].astype(np.float32) / 255 - mean) / std, atol=1e-6)


def test_metrics_on_unscaled_targets(dataset):
  split = dataset.splits["test"]
  pred_scaled = np.clip(split.labels + 0.05, 0, 1)
  y = misme.unscale_targets(split.labels, dataset)
  p = misme.unscale_targets(pred_scaled, dataset)
  # Every prediction is 0.05 * 0.17 = 0.0085 m3/m3 too high.
  assert regression_metrics.mae(y, p) == pytest.approx(0.0085)
  assert regression_metrics.mape(y, p) == pytest.approx(
      100 * np.mean(0.0085 / np.array([0.16, 0.30, 0.2, 0.25])))


def test_cache_equals_on_demand_and_options(data_dir, dataset, tmp_path):
  lazy = data.load_dataset(_cfg(data_dir, storage="on_demand"))
  for s in dataset.splits:
    idx = np.arange(len(dataset.splits[s]))
    a, b = dataset.splits[s].batch(idx), lazy.splits[s].batch(idx)
    for m in ("image", "tabular", "label"):
      np.testing.assert_array_equal(a[m], b[m])
  fixed = data.load_dataset(_cfg(data_dir, storage="on_demand",
                                 target_min=0.0, target_max=0.5))
  np.testing.assert_allclose(fixed.splits["test"].labels,
                             np.array([0.16, 0.30, 0.2, 0.25]) / 0.5,
                             rtol=1e-6)
  raw = data.load_dataset(_cfg(data_dir, storage="on_demand",
                               target_scaling="none"))
  np.testing.assert_allclose(raw.splits["val"].labels, [0.19, 0.35, 0.22],
                             rtol=1e-6)


def test_bad_input_raises_data_error(data_dir, tmp_path):
  with pytest.raises(errors.DataError, match="MIS-ME folder"):
    data.load_dataset(_cfg(str(tmp_path)))
  with pytest.raises(errors.DataError, match="nope.xlsx is missing"):
    data.load_dataset(_cfg(data_dir, storage="on_demand",
                           test_table="nope.xlsx"))
  root = os.path.join(data_dir, "misme")
  bad = os.path.join(root, "bad.csv")
  with open(bad, "w") as f:
    f.write("image,vwc\nx.jpg,0.2\n")
  with pytest.raises(errors.DataError, match="lacks the column"):
    data.load_dataset(_cfg(data_dir, storage="on_demand", val_table=bad))
  rows = _table(VAL)
  rows[2][HEADER.index("vwc")] = NAN
  with open(bad, "w") as f:
    for row in rows:
      f.write(",".join("" if isinstance(v, float) and np.isnan(v) else str(v)
                       for v in row) + "\n")
  with pytest.raises(errors.DataError, match="row 3 .* target 'vwc' is"
                     " missing"):
    data.load_dataset(_cfg(data_dir, storage="on_demand", val_table=bad))
  rows = _table(VAL)
  rows[1][1] = "OK009_missing.jpg"
  with open(bad, "w") as f:
    for row in rows:
      f.write(",".join("" if isinstance(v, float) and np.isnan(v) else str(v)
                       for v in row) + "\n")
  with pytest.raises(errors.DataError, match="skip_missing_images"):
    data.load_dataset(_cfg(data_dir, storage="on_demand", val_table=bad))
  ds = data.load_dataset(_cfg(data_dir, storage="on_demand", val_table=bad,
                              skip_missing_images=True))
  assert len(ds.splits["val"]) == 2
  not_zip = os.path.join(root, "broken.xlsx")
  with open(not_zip, "w") as f:
    f.write("image,vwc\n")
  with pytest.raises(errors.DataError, match="not a readable .xlsx"):
    data.load_dataset(_cfg(data_dir, storage="on_demand",
                           test_table=not_zip))
  with pytest.raises(errors.ConfigError, match="target_min and target_max"):
    data.load_dataset(_cfg(data_dir, target_min=0.0))


def test_config_presets_build_and_validate():
  module = fx.check_presets("misme", misme.MODALITIES, ("small,joint",))
  paper = module.get_config()
  assert paper.model.encoders.image.kind == "mobilenetv2"
  assert tuple(paper.model.encoders.tabular.hidden_dims) == (256, 128, 64,
                                                             32, 16)


def test_small_model_accepts_fixture_inputs(dataset):
  c = fx.config_module("misme").get_config("small")
  out = fx.abstract_outputs(c, dataset)
  assert out.logits.shape == (2, 1)
