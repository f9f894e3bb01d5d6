"""`ray_unlearn.platform.core.data` re-exports its names lazily (PEP 562), so config
validation (which needs only `DataConfig`) does not import pyarrow or scikit-learn."""

from __future__ import annotations

import importlib

import pytest

import ray_unlearn.platform.core.data as data
from tests.conftest import imported_by


def test_every_export_resolves_to_its_submodule():
    assert sorted(data.__all__) == sorted(data._EXPORTS)
    for name, module in data._EXPORTS.items():
        sub = importlib.import_module(f"ray_unlearn.platform.core.data.{module}")
        assert getattr(data, name) is getattr(sub, name), name
        assert name in dir(data)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from ray_unlearn.platform.core.data import nope", {})


def test_config_section_alone_imports_no_pyarrow():
    code = "from ray_unlearn.platform.core.data import DataConfig\nDataConfig(source='digits')"
    assert imported_by(code, ("pyarrow", "sklearn", "numpy")) == []
