"""The command line answers --help and refuses bad arguments without importing torch."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: Runs the command line's ``main`` on the arguments given after ``-c``, then prints its exit
#: status and whether torch was imported, one per line.
MAIN = textwrap.dedent("""
    import sys
    from kdflow.launch.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as done:
        code = done.code
    print(code)
    print("torch" in sys.modules)
""")


def _main(*args: str) -> tuple[int, bool, str]:
    """Exit status of ``kdflow ARGS`` run in a new interpreter, whether it imported torch, and
    what it wrote to stderr."""
    done = subprocess.run([sys.executable, "-c", MAIN, *args], capture_output=True, text=True,
                          check=True, timeout=120)
    code, torch_imported = done.stdout.splitlines()[-2:]
    return int(code), torch_imported == "True", done.stderr


def _imports(statement: str) -> bool:
    """Whether running ``statement`` in a new interpreter imports torch."""
    done = subprocess.run([sys.executable, "-c", f"{statement}\nimport sys\n"
                           "print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.split()[-1] == "True"


def test_help_does_not_import_torch():
    assert _main("--help")[:2] == (0, False)
    assert _main("run", "--help")[:2] == (0, False)


def test_bad_arguments_are_refused_without_importing_torch():
    code, torch_imported, err = _main("frobnicate")
    assert (code, torch_imported) == (2, False) and "invalid choice: 'frobnicate'" in err
    code, torch_imported, err = _main("run", "--no-such-flag")
    assert (code, torch_imported) == (2, False) and "--no-such-flag" in err


@pytest.mark.slow
def test_packages_import_without_torch_and_exports_still_load():
    assert not _imports("import kdflow")
    assert not _imports("import kdflow.methods")
    assert not _imports("from kdflow.methods import ConfigError")
    assert not _imports("import kdflow.methods.config, kdflow.methods.registry")
    assert _imports("from kdflow.methods import MODELS, DISTILLERS\n"
                    "assert 'resnet8' in MODELS and 'kd' in DISTILLERS")


def test_every_export_of_methods_loads():
    import kdflow.methods as methods

    for name in methods.__all__:
        assert getattr(methods, name) is not None
    assert set(methods.__all__) <= set(dir(methods))
    with pytest.raises(AttributeError, match="no_such_name"):
        methods.no_such_name  # noqa: B018
