"""The folders are the layers (docs/architecture.md). Read from the source with ``ast``, so a new module is
checked by the folder it sits in; nothing here lists modules by hand.

    core:  base <- model <- calib <- pruning <- evaluate   (no Hugging Face imports)
    hf:    mone_jax.convert (convert/)
    app:   mone_jax.app, mone_jax.demo and the facade mone_jax/__init__.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = ("base", "model", "calib", "pruning", "evaluate")  # each may import itself and the ones before it
LAYERS = {**{f"mone_jax.{p}": i for i, p in enumerate(CORE)}, "mone_jax.convert": len(CORE),
          "mone_jax.app": len(CORE) + 1, "mone_jax.demo": len(CORE) + 1, "mone_jax": len(CORE) + 1}
HF_ONLY = ("transformers", "torch", "datasets", "tokenizers", "huggingface_hub", "lm_eval")


def _modules() -> dict[str, Path]:
    out = {}
    for root, pkg in ((REPO / "mone_jax", "mone_jax"), (REPO / "convert", "mone_jax.convert")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((pkg, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _folder(module: str) -> str:
    """The layer folder of a module: the longest key of LAYERS it sits in."""
    return max((f for f in LAYERS if module == f or module.startswith(f + ".")), key=len)


def test_every_module_sits_in_a_layer_folder():
    loose = [m for m, p in _modules().items() if _folder(m) == "mone_jax" and m != "mone_jax"]
    assert not loose, f"modules outside a layer folder: {loose} (move them under one of {sorted(LAYERS)})"


def test_dependencies_point_one_way():
    mods = _modules()
    problems = []
    for name, path in mods.items():
        here = _folder(name)
        for imp in _imports(path, top_level_only=False):
            if imp.startswith("mone_jax"):
                if imp not in mods and imp.rsplit(".", 1)[0] in mods:
                    imp = imp.rsplit(".", 1)[0]  # `from package import name`: the package
                there = _folder(imp)
                if LAYERS[there] > LAYERS[here]:
                    problems.append(f"{name} ({here}) imports {imp} ({there})")
            elif LAYERS[here] < LAYERS["mone_jax.convert"] and imp.split(".")[0] in HF_ONLY:
                problems.append(f"{name} (core) imports {imp}")
    assert not problems, "\n".join(problems)


def test_no_module_shadows_the_standard_library():
    """`python mone_jax/app/cli.py` puts that folder first on sys.path: a module named like a standard one
    (inspect, io, ...) would then be imported by numpy in its place."""
    clash = sorted(str(p.relative_to(REPO)) for p in _modules().values()
                   if p.stem in sys.stdlib_module_names)
    assert not clash, f"modules named like standard-library ones: {clash}"


def test_no_subpackage_hides_a_public_name():
    """Importing a subpackage binds its name on ``mone_jax``: one named like a facade function (``prune``)
    would replace that function once anything imported the subpackage."""
    import mone_jax

    subpackages = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    assert not subpackages & set(mone_jax.__all__), subpackages & set(mone_jax.__all__)


def test_the_shipped_modeling_file_stands_alone():
    """modeling_mone.py runs inside exports, where mone-jax is not installed."""
    imports = _imports(_modules()["mone_jax.convert.modeling_mone"], top_level_only=False)
    assert not [i for i in imports if i.startswith("mone_jax")]


def test_no_import_cycles():
    mods = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in mods and m != name}
             for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_registered_family_is_under_the_shared_cross_checks():
    """A family added to the registry without a test config would escape every cross-check."""
    from conftest import PER_FAMILY

    from mone_jax.convert.families import FAMILIES

    assert sorted(FAMILIES) == sorted(f for f, _ in PER_FAMILY)


def test_test_files_do_not_import_each_other():
    """Shared checks live in tests/checks.py, tests/reference.py and conftest.py, not in another test file."""
    found = [f"{p.name} imports {m}" for p in (REPO / "tests").glob("test_*.py")
             for m in _imports(p, top_level_only=False) if m.split(".")[0].startswith("test_")]
    assert not found, found
