"""Registries fill themselves: every module that registers something is imported, nothing
else is, and no hand-kept list can drift from the files on disk."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import kdflow.methods.distillers as distillers
import kdflow.methods.models as models
import kdflow.orchestrator.data as data
from kdflow.methods.discovery import calls_any, import_registering_modules


def _registered_names(folder: Path, decorator: str) -> set:
    """The names registered by ``@decorator("name"...)`` in the folder's sources."""
    pattern = re.compile(rf"{decorator}\(\s*\"(\w+)\"")
    return {name for file in folder.glob("*.py") for name in pattern.findall(file.read_text())}


@pytest.mark.parametrize("package, registry, decorator", [
    (distillers, distillers.DISTILLERS, "register_distiller"),
    (models, models.MODELS, "register_model"),
    (data, data.DATASETS, "register_dataset"),
])
def test_every_name_registered_in_a_source_file_is_in_the_registry(package, registry, decorator):
    in_files = _registered_names(Path(package.__file__).parent, decorator)
    assert in_files and in_files <= set(registry.names())


def test_only_modules_that_register_are_imported(tmp_path, monkeypatch):
    package = tmp_path / "plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "registry.py").write_text(
        "SEEN = []\n\ndef register_thing(name):\n    def wrap(cls):\n"
        "        SEEN.append(name)\n        return cls\n    return wrap\n")
    (package / "alpha.py").write_text(
        "from plugin_pkg.registry import register_thing\n\n@register_thing('alpha')\n"
        "class Alpha:\n    pass\n")
    (package / "beta.py").write_text(
        "import plugin_pkg.registry as r\n\nr.register_thing('beta')(object)\n")
    (package / "helper.py").write_text("raise ImportError('an optional back end is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = import_registering_modules("plugin_pkg", [str(package)], ("register_thing",))
    assert found == ["plugin_pkg.alpha", "plugin_pkg.beta"]
    assert sys.modules["plugin_pkg.registry"].SEEN == ["alpha", "beta"]
    assert "plugin_pkg.helper" not in sys.modules


def test_a_broken_registering_module_fails_loudly(tmp_path, monkeypatch):
    package = tmp_path / "broken_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("register_thing('bad')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(NameError):
        import_registering_modules("broken_pkg", [str(package)], ("register_thing",))


def test_a_definition_or_a_mention_is_not_a_registration():
    assert not calls_any("def register_thing(name):\n    '''register_thing(x)'''\n",
                         ("register_thing",))
    assert calls_any("@a.register_thing('x')\nclass C: pass\n", ("register_thing",))
