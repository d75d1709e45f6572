"""Predict: every stored row gets the cluster, distance and cosine an independent float64
numpy computation gives, for both metrics, with the objects table attached row by row."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest

from pipeline import schema, sinks, store
from pipeline.predict import assign_clusters


@pytest.fixture
def stored(tmp_path):
    """700 rows x 16 dims in blocks of 256 (a ragged last block), with an objects table."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    ids = rng.permutation(700)
    url = str(tmp_path / "e.zarr")
    group = store.create_store(url, 700, 16, 256)
    group[store.VECTORS][:] = x
    group[store.OBJECT_IDS][:] = ids
    objects = pd.DataFrame({schema.OBJECT_ID: np.sort(ids), schema.SOURCE_ROW: np.sort(ids)})
    for column in ("batch_folder", "username", "res_name", "bbox", "tag", "image_name"):
        objects[column] = "v"
    objects["score"], objects["idx"], objects["bbox_ok"] = 0.5, 0, True
    objects_url = str(tmp_path / "objects.parquet")
    sinks.write_object_parts(objects, ids, objects_url, 256, progress=False)
    centres = rng.standard_normal((9, 16)).astype(np.float32)
    return x, ids, url, objects_url, centres


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assignments_equal_a_float64_numpy_oracle(stored, metric):
    x, ids, url, objects_url, centres = stored
    if metric == "cosine":  # a cosine model holds unit centres
        centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    (table,) = dask.compute(assign_clusters(url, objects_url, centres, metric))
    assert table[schema.OBJECT_ID].tolist() == ids.tolist()  # store order, objects attached
    x64, c64 = x.astype(np.float64), centres.astype(np.float64)
    cos = (x64 @ c64.T) / np.linalg.norm(x64, axis=1)[:, None] / np.linalg.norm(c64, axis=1)
    if metric == "euclidean":
        d2 = ((x64[:, None, :] - c64[None]) ** 2).sum(-1)
        labels = d2.argmin(1)
        dist = np.sqrt(d2[np.arange(len(x)), labels])
    else:
        labels = cos.argmax(1)
        dist = np.sqrt(np.maximum(2 - 2 * cos[np.arange(len(x)), labels], 0))
    np.testing.assert_array_equal(table["cluster"].to_numpy(), labels)
    np.testing.assert_allclose(table["sim"], cos[np.arange(len(x)), labels], atol=1e-5)
    np.testing.assert_allclose(table["dist"], dist, atol=1e-4)
