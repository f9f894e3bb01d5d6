"""Methods from other installed packages, found through the ``ray_unlearn.methods`` entry
point group (what a plug-in's pyproject.toml declares)."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from ray_unlearn.platform import methods
from ray_unlearn.platform.methods import registry


def _plugin_module(tmp_path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("ru_plugin_")]:
        del sys.modules[mod]


def _entry_points(*eps: EntryPoint):
    def fake(group: str):
        assert group == "ray_unlearn.methods"
        return list(eps)

    return fake


def test_an_installed_plugin_registers_its_method(plugin_path, monkeypatch):
    _plugin_module(
        plugin_path,
        "ru_plugin_ok",
        """
        from ray_unlearn.platform.methods import Method, register
        from ray_unlearn.platform.methods.sisa import SisaRetrain

        class Plugged(SisaRetrain):
            name = "plugged"
            description = "a plug-in's strategy"

        register(Method("plugged", strategies=(Plugged,)))
        """,
    )
    ep = EntryPoint("plugged", "ru_plugin_ok", "ray_unlearn.methods")
    monkeypatch.setattr("importlib.metadata.entry_points", _entry_points(ep))
    try:
        methods._load_installed_plugins()
        assert "plugged" in registry.strategy_names()
        assert any(r["name"] == "plugged" for r in registry.listing())
    finally:
        if "plugged" in {m.name for m in registry.methods()}:
            registry.unregister("plugged")
    assert "plugged" not in registry.strategy_names()


def test_a_broken_plugin_is_named(plugin_path, monkeypatch):
    _plugin_module(plugin_path, "ru_plugin_broken", "raise RuntimeError('boom')\n")
    ep = EntryPoint("broken", "ru_plugin_broken", "ray_unlearn.methods")
    monkeypatch.setattr("importlib.metadata.entry_points", _entry_points(ep))
    with pytest.raises(ImportError, match="plug-in 'broken' .*boom"):
        methods._load_installed_plugins()
