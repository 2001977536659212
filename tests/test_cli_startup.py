"""The command line parses before anything heavy is imported, and its names stay true.

``--help`` answers in well under a second because parsing needs the standard library alone
(``benchmarks/cli_startup.py`` measures the time); these tests check the structure that makes
it so: which modules a parse imports, and that the names the parser offers without importing
the registry equal the registry's.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import class_space_saliency
from class_space_saliency import _cli_common

PACKAGE = Path(class_space_saliency.__file__).parent
HEAVY = ("torch", "timm", "matplotlib", "transformers", "open_clip", "cv2", "numpy", "PIL")

PARSE_AND_LIST_IMPORTS = """
import json, sys
from class_space_saliency.cli import build_parser
try:
    build_parser().parse_args(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["demo", "--help"], ["attribute", "--help"], ["sanity", "--help"],
     ["benchmark", "--help"], ["attribute", "cat.png", "--layer", "0,2", "--max-size", "64"]],
)  # fmt: skip
def test_parsing_imports_nothing_heavy(argv):
    ran = subprocess.run(
        [sys.executable, "-c", PARSE_AND_LIST_IMPORTS, *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = set(json.loads(ran.stdout.strip().splitlines()[-1]))
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_module_entry_point_help_imports_nothing_heavy():
    script = (
        "import runpy, sys; sys.argv = ['class_space_saliency', '--help']\n"
        "try:\n    runpy.run_module('class_space_saliency', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(set({HEAVY!r}) & {{n.split('.')[0] for n in sys.modules}}))"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "usage: class-space-saliency" in ran.stdout
    assert ran.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_package_names_load_on_first_use():
    script = (
        "import sys, class_space_saliency as c\n"
        "print('torch' in sys.modules)\n"
        "print(c.ClassSpaceSaliency.__module__, 'torch' in sys.modules)\n"
        "print(c.models.DEFAULT_MODEL)"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert ran.stdout.split() == [
        "False", "class_space_saliency.methods.class_space", "True", "fashion-scenes"
    ]  # fmt: skip
    assert set(class_space_saliency.__all__) == {*class_space_saliency._EXPORTS, "analysis"}
    for name in class_space_saliency.__all__:
        assert getattr(class_space_saliency, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        class_space_saliency.nope  # noqa: B018


def test_names_offered_before_import_equal_the_registry_and_presets():
    from class_space_saliency import models, sanity
    from class_space_saliency.evaluation import PRESETS
    from class_space_saliency.methods import VARIANTS, list_methods
    from class_space_saliency.methods.base import UPSAMPLE_MODES

    assert tuple(list_methods(needs_fitting=False)) == _cli_common.BUILTIN_METHODS
    assert tuple(VARIANTS) == _cli_common.BUILTIN_VARIANTS
    assert tuple(sanity.DEFAULT_METHODS) == _cli_common.SANITY_METHODS
    assert tuple(models.EMBEDDED_MODELS) == _cli_common.EMBEDDED_MODELS
    assert _cli_common.DEFAULT_MODEL == models.DEFAULT_MODEL
    assert tuple(PRESETS) == _cli_common.PROTOCOL_PRESETS
    assert _cli_common.UPSAMPLE_MODES == UPSAMPLE_MODES
    assert set(_cli_common.BENCHMARK_METHODS) <= set(list_methods())
    from class_space_saliency.visualize import colormap_names

    assert set(_cli_common.COLORMAP_EXAMPLES) <= set(colormap_names())


def imported_package_modules(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (relative imports, anywhere in it)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - node.level + 1]
            found.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
    return found


def test_imports_flow_one_way_between_the_two_cli_modules():
    assert "evaluation.cli" in imported_package_modules(PACKAGE / "cli.py")
    assert "cli" not in imported_package_modules(PACKAGE / "evaluation" / "cli.py")
    tree = ast.parse((PACKAGE / "_cli_common.py").read_text())
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert all(
        (isinstance(node, ast.ImportFrom) and node.level == 0) or isinstance(node, ast.Import)
        for node in top_level
    )  # the light module imports nothing of the package at import time


def test_unknown_methods_are_refused_by_the_parser(capsys):
    from class_space_saliency.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["attribute", "cat.png", "--methods", "class_space", "nope"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.splitlines()[-1].startswith(
        "class-space-saliency attribute: error: argument --methods: invalid choice: 'nope' "
        "(choose from 'class_space', "
    )


@pytest.mark.parametrize("command", ["demo", "attribute", "sanity", "benchmark"])
def test_help_shows_only_defaults_worth_reading(command, capsys):
    from class_space_saliency.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default:" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: predicted class)" in text or command != "attribute"  # said once, in words
