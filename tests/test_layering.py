"""The house has walls: the import graph of the library, read from the source with `ast`
(imports inside functions included), has no cycle, and every import goes down the
declared layers (or stays inside its own package). A second set of tests shows the
checker finds a cycle and a climbing import in a small synthetic package."""

from __future__ import annotations

import ast
import os

from helpers import ROOT

# The layers, from the bottom up. A module may import a module of a lower layer, or one
# of its own package; never one above, nor a sibling package of its own layer.
LAYERS = [
    ["data_pipeline"],  # reading, tokenizing and packing data (knows nothing of the model)
    ["lm.config"],  # configuration dataclasses and their checks
    ["lm.agent"],  # tools a model calls: the registry and the calculator (knows nothing of the model)
    ["lm.experiment"],  # loading an experiment (a Python module or a run's config.json)
    ["lm.model"],  # the transformer, attention kernels, sharding rules, LoRA, sizes
    ["lm.sampling", "lm.interop"],  # decoding and sampling; the Hugging Face format
    ["lm.objectives"],  # losses: next token, preference and reward, policy (RL)
    ["lm.train"],  # engine, loop, optimisers, checkpoints, run directory, starting points
    ["lm.eval"],  # scoring tasks, reward-model scoring, the lm-evaluation-harness adapter
    ["lm.stages"],  # pretrain, sft, reward, dpo, grpo, ppo and what they share
    ["lm.serve", "lm.tools"],  # the server and chat; benchmarks, planning, comparison, conversion
    ["lm.cli"],  # the command line
    ["lm.__main__"],  # python -m lm
    ["experiments"],  # experiment configs (users' code: they may import anything below)
]


def module_files(root: str, packages: list[str]) -> dict[str, str]:
    """{dotted module name: path} of every .py file under the top-level `packages`."""
    out = {}
    for pkg in packages:
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def import_graph(root: str, packages: list[str]) -> dict[str, set[str]]:
    """{module: modules it imports}, first-party only, with every `import` and `from ...
    import` of the file wherever it stands (module level, functions, classes, try blocks).
    `from a.b import c` is an import of a.b.c where that is a module, else of a.b; importing
    a module also runs its packages' __init__ (the top-level package's excepted)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    pkg = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            target = resolve(t)
            if target is None or target == mod:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run first
                dep = ".".join(parts[:i])
                if dep in modules and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, the package that places it) of `module`."""
    best = None
    for i, group in enumerate(layers):
        for pkg in group:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    return best


def climbing(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports that go up the layers, or across to another package of the same layer."""
    bad = []
    for mod, deps in sorted(graph.items()):
        here = layer_of(mod, layers)
        for dep in sorted(deps):
            there = layer_of(dep, layers)
            if here is None or there is None:
                bad.append(f"{mod} -> {dep}: not in any layer")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{mod} (layer {here[0]}, {here[1]}) -> {dep} (layer {there[0]}, {there[1]})")
    return bad


PACKAGES = ["lm", "data_pipeline", "experiments"]


def test_the_library_has_no_import_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # the whole library was read
    assert cycles(graph) == []


def test_every_import_goes_down_the_layers():
    graph = import_graph(ROOT, PACKAGES)
    assert all(layer_of(m, LAYERS) for m in graph if m != "lm"), [m for m in graph if not layer_of(m, LAYERS)]
    graph.pop("lm", None)  # the root package's (empty) __init__
    assert climbing(graph, LAYERS) == []


def test_function_local_imports_are_only_optional_or_lazy_dependencies():
    """Heavy or optional packages may be imported where they are used (torch, transformers,
    lm-eval, starlette, ...); the CLI imports each command's modules when it runs. Nothing
    else of the library hides an import inside a function."""
    allowed_roots = {"torch", "transformers", "lm_eval", "starlette", "uvicorn", "matplotlib", "tensorboardX",
                     "pyarrow", "tensorflow_datasets", "array_record", "pydoc_data", "datatrove", "py3langid",
                     "loguru"}
    allowed_modules = {"data_pipeline.curate_steps"}  # the glue over datatrove (the `curate` extra)
    hidden = []
    for mod, path in module_files(ROOT, ["lm", "data_pipeline"]).items():
        if mod in ("lm.cli", "data_pipeline.cli"):  # the command lines: each command imports what it runs
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if isinstance(node, ast.ImportFrom) and {f"{name}.{a.name}" for a in node.names} <= allowed_modules:
                        continue
                    if name.split(".")[0] not in allowed_roots and not name.startswith("jax.experimental.pallas"):
                        hidden.append(f"{mod}.{fn.name}: {ast.unparse(node)}")
    assert hidden == []


def _package(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def test_the_checker_finds_a_cycle_made_by_a_function_local_import(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g  # hidden in a function\n    return g\n",
        "pkg/high.py": "from pkg import low\n\ndef g():\n    return low\n",
        "pkg/other.py": "import pkg.low\n",
    })
    graph = import_graph(root, ["pkg"])
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.high"] == {"pkg.low"}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    # and none once the hidden import is gone
    (tmp_path / "pkg" / "low.py").write_text("def f():\n    return 1\n")
    assert cycles(import_graph(root, ["pkg"])) == []


def test_the_checker_finds_an_import_that_climbs_the_layers(tmp_path):
    root = _package(tmp_path, {
        "app/__init__.py": "",
        "app/base/__init__.py": "",
        "app/base/core.py": "import os\n",
        "app/top/__init__.py": "",
        "app/top/cmd.py": "from app.base import core\n",
        "app/side/__init__.py": "",
        "app/side/tool.py": "from app.base.core import os\n",
    })
    layers = [["app.base"], ["app.top", "app.side"]]
    graph = import_graph(root, ["app"])
    graph.pop("app")
    assert climbing(graph, layers) == []
    (tmp_path / "app" / "base" / "core.py").write_text("def f():\n    from app.top.cmd import x\n")
    (tmp_path / "app" / "side" / "tool.py").write_text("from app.top import cmd\n")
    graph = import_graph(root, ["app"])
    graph.pop("app")
    assert climbing(graph, layers) == [
        "app.base.core (layer 0, app.base) -> app.top (layer 1, app.top)",
        "app.base.core (layer 0, app.base) -> app.top.cmd (layer 1, app.top)",
        "app.side.tool (layer 1, app.side) -> app.top (layer 1, app.top)",
        "app.side.tool (layer 1, app.side) -> app.top.cmd (layer 1, app.top)",
    ]
