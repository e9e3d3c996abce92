"""Layers point one way: every import in the package's source (module level and inside functions,
`import x` and `from x import y`, relative ones resolved) goes to its own layer or a lower one.

The order, lowest first (a module may import its own layer and the ones before it):

    errors, files, the package root (__version__)
    < config < data < model < train < eval < post < stages (the registry of training stages)
    < report, serve < ablate, demo, doctor < cli < __main__

eval sits below post: the chat evals, GRPO's rewards and DPO's metrics use eval's scoring and its
one answer checker (eval/answers.py), and eval needs nothing from post. A lower layer that needs
something from above gets it passed in: the Trainer is handed the in-training evaluation
(eval/during_training.DuringTraining) by the stage that runs it.
"""

import ast
from pathlib import Path

import smoltrain

PACKAGE = Path(smoltrain.__file__).parent
LAYERS = [
    {"errors", "files", ""},  # "" is the package root: smoltrain/__init__.py (the version)
    {"config"},
    {"data"},
    {"model"},
    {"train"},
    {"eval"},
    {"post"},
    {"stages"},
    {"report", "serve"},
    {"ablate", "demo", "doctor"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Upward imports another branch removes ("config reads no files": the stages work). Each entry must
# still occur: delete it here when its import is gone.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _component(module: str) -> str:
    """smoltrain.post.chat.evals -> "post"; smoltrain -> "" (the root); smoltrain.cli -> "cli"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported_modules(node: ast.AST, package: list[str]) -> list[str]:
    """The smoltrain modules an import statement reads; `package` is the importing file's package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # from . import x / from ..y import z
        base = package[: len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module == "smoltrain":  # from smoltrain import cli: the submodule when there is one, else the root
        return [f"smoltrain.{a.name}" if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                else "smoltrain" for a in node.names]
    return [module]


def upward_imports() -> list[tuple[str, int, str, str]]:
    """(file relative to the package, line, its component, the higher component it imports)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        parts = ["smoltrain", *relative.with_suffix("").parts]
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        here = _component(".".join(parts if parts[-1] != "__init__" else parts[:-1]))
        assert here in LAYER, f"{relative}: {here!r} has no layer; add it to LAYERS in this test and to the docstring"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for module in _imported_modules(node, package):
                if module != "smoltrain" and not module.startswith("smoltrain."):
                    continue
                there = _component(module)
                assert there in LAYER, f"{relative}:{node.lineno}: {module} has no layer"
                if LAYER[there] > LAYER[here]:
                    found.append((str(relative), node.lineno, here or "smoltrain", there))
    return found


def test_the_checker_resolves_relative_and_root_imports():
    package = ["smoltrain", "post"]
    relative = ast.parse("from ..train import trainer\nfrom . import chat_eval\nfrom smoltrain import cli, __version__")
    assert [_imported_modules(node, package) for node in relative.body] == [
        ["smoltrain.train"], ["smoltrain.post"], ["smoltrain.cli", "smoltrain"]]
    inside = ast.parse("def f():\n    import smoltrain.report.run as run\n")
    assert [m for node in ast.walk(inside) for m in _imported_modules(node, package)] == ["smoltrain.report.run"]


def test_imports_point_down_the_layers():
    found = upward_imports()
    unexpected = [f"smoltrain/{file}:{line}: {here} imports {there}" for file, line, here, there in found
                  if (file, there) not in KNOWN_UPWARD]
    assert not unexpected, "imports that point up the layers:\n" + "\n".join(unexpected)
    gone = KNOWN_UPWARD - {(file, there) for file, _, _, there in found}
    assert not gone, f"known upward imports that no longer occur (remove them from KNOWN_UPWARD): {sorted(gone)}"
