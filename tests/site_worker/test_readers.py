"""Dataset readers are registered by dataset.kind (site_worker/readers/): one module per kind,
found by the package itself; site.toml's formats and suffixes come from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from site_worker import readers
from site_worker.config import SiteConfigError, site_config_from_dict


def test_every_kind_the_schema_allows_has_one_reader():
    from typing import get_args

    from protocol.config import DatasetSpec

    kinds = set(get_args(DatasetSpec.model_fields["kind"].annotation))
    assert set(readers.readers()) == kinds == {"tabular", "signal"}
    for kind, reader in readers.readers().items():
        assert reader.kind == kind
        for fmt in reader.formats:
            assert readers.by_format(fmt) is reader


def test_formats_and_suffixes_come_from_the_readers():
    assert readers.formats() == ("csv", "parquet", "npy")  # the default kind's first, as site.toml errors list them
    assert readers.infer_format(Path("a.TSV")) == "csv"
    assert readers.infer_format(Path("a.pq")) == "parquet"
    assert readers.infer_format(Path("a_X.npy")) == "npy"
    assert readers.infer_format(Path("a.xlsx")) is None
    with pytest.raises(KeyError):
        readers.by_format("xlsx")


def _site(tmp_path: Path, table: dict) -> dict:
    for name in ("k", "c"):
        (tmp_path / name).write_text("x")
    return {"site_id": "s", "federation": "f", "broker_url": "memory://", "key_path": "k", "coordinator_pub": "c",
            "state_dir": "st", "datasets": {"d": table}}


def test_site_toml_format_rules_follow_the_reader(tmp_path):
    np.save(tmp_path / "d_X.npy", np.zeros((4, 1, 8), np.float32), allow_pickle=False)
    np.save(tmp_path / "d_y.npy", np.zeros(4, np.int64), allow_pickle=False)
    # a signal pair keeps its labels apart: labels_path required, target optional
    with pytest.raises(SiteConfigError) as e:
        site_config_from_dict(_site(tmp_path, {"path": "d_X.npy"}), base_dir=tmp_path)
    assert e.value.key == "datasets.d.labels_path"
    cfg = site_config_from_dict(_site(tmp_path, {"path": "d_X.npy", "labels_path": "d_y.npy"}), base_dir=tmp_path)
    assert (cfg.datasets["d"].format, cfg.datasets["d"].target) == ("npy", "label")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(SiteConfigError) as e:
        site_config_from_dict(_site(tmp_path, {"path": "t.xlsx", "target": "y"}), base_dir=tmp_path)
    assert e.value.key == "datasets.d.format" and '"csv" | "parquet" | "npy"' in str(e.value)


def test_the_simulators_site_toml_keys_are_the_readers(tmp_path):
    from simulator.evaluation import source_for
    from simulator.workspace import site_toml

    x = tmp_path / "s_X.npy"
    src = source_for(x, "label", "ecg")
    assert (src.format, src.labels_path) == ("npy", tmp_path / "s_y.npy")
    assert source_for(tmp_path / "s.csv", "y", "hf").format == "csv"
    text = site_toml(site_id="s", federation="f", broker_url="memory://", key=tmp_path / "k",
                     coordinator_pub=tmp_path / "c", state_dir=tmp_path / "st", dataset="ecg", train=x,
                     target="label", kind="signal")
    assert 'format = "npy"' in text and f'labels_path = "{tmp_path / "s_y.npy"}"' in text
