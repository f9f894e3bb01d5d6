"""`ray_unlearn.platform.core.data` re-exports its names lazily (PEP 562), so config
validation (which needs only `DataConfig`) does not import pyarrow or scikit-learn."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import ray_unlearn.platform.core.data as data


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
    code = (
        "import sys\n"
        "from ray_unlearn.platform.core.data import DataConfig\n"
        "DataConfig(source='digits')\n"
        "print(sorted(m for m in ('pyarrow', 'sklearn', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
