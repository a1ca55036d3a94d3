"""Dependencies run one way: core (no Hugging Face) <- HF layer (``mone_jax.convert``) <- application
(pipelines, CLI, the package facade); no import cycles. Read from the source with ``ast``, so a new module
is checked by default (anything in mone_jax/ not listed as application is core)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = {"mone_jax", "mone_jax.compare_job", "mone_jax.cli", "mone_jax.jobs", "mone_jax.scale", "mone_jax.sequential", "mone_jax.inspect", "mone_jax.data", "mone_jax.harness", "mone_jax.diff",
       "mone_jax.mix",
       "mone_jax.demo"}
HF_ONLY = ("transformers", "torch", "datasets", "tokenizers", "huggingface_hub")


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
            found.add(node.module)
    return found


def _layer(module: str) -> str:
    if module in APP or module.startswith("mone_jax.demo"):
        return "app"
    return "hf" if module.startswith("mone_jax.convert") else "core"


def test_dependencies_point_one_way():
    mods = _modules()
    allowed = {"core": {"core"}, "hf": {"core", "hf"}, "app": {"core", "hf", "app"}}
    problems = []
    for name, path in mods.items():
        layer = _layer(name)
        for imp in _imports(path, top_level_only=False):
            if imp.startswith("mone_jax"):
                target = max((m for m in mods if imp == m or imp.startswith(m + ".")), key=len, default=imp)
                if _layer(target) not in allowed[layer]:
                    problems.append(f"{name} ({layer}) imports {target} ({_layer(target)})")
            elif layer == "core" and imp.split(".")[0] in HF_ONLY:
                problems.append(f"{name} (core) imports {imp}")
    assert not problems, "\n".join(problems)


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
