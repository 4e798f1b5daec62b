"""The package's import graph (docs/ARCHITECTURE.md): no circles, imports go down the layers, and stages are
imported only by what runs them.

Every `import llm2slm_cli...` and `from ... import` in a module counts, at module level or inside a function (a
function-level import is still a dependency, only a later one); relative imports are resolved."""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm2slm_cli"
# top to bottom, as docs/ARCHITECTURE.md draws them: a module imports its own layer (without a circle) or lower ones
LAYERS = {
    "entry points": ["cli", "__main__", "demo"],
    "stages": ["stages", "stages.*"],
    "stage parts": ["server", "server.*", "bench", "bench.*"],
    "face": ["", "api"],
    "configs": ["config"],
    "library": ["generation", "sharding", "corpus", "streaming", "features", "teacher", "batching", "quantize", "judge",
                "pydoc_task", "hf_format", "model_card", "gguf_export", "llama_backend"],
    "model": ["checkpoint", "llm2slm", "peft_baselines", "kd", "decoding", "continuous", "padding", "cpu_head",
              "int8_linear"],
    "foundations": ["surgery", "fingerprints", "loading", "presets", "data", "runtime", "validation", "artifacts",
                    "errors", "version"],
    "remote code": ["remote_code", "remote_code.*"],
}
# what may import a stage: the CLI, which wires one command to each, and the demo, which runs them in one process
RUNS_STAGES = {"llm2slm_cli.cli", "llm2slm_cli.demo"}


def _modules() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, anywhere in its file; `from pkg import mod` counts mod when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import llm2slm_cli.stages.generate.x`: the module part
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected group of modules (Tarjan), as a path that ends where it starts;
    a group of more modules than its circle shows lists the others after it, in brackets."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = [_circle(graph, group) for group in groups]
    return [c + ([f"[also: {', '.join(sorted(g - set(c)))}]"] if g - set(c) else []) for c, g in zip(circles, groups)]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in {group}")


def layer(module: str) -> int | None:
    """The index of `module`'s layer in LAYERS (0 is the top); None for a module no layer names."""
    short = module.removeprefix("llm2slm_cli").removeprefix(".")
    return next((i for i, patterns in enumerate(LAYERS.values()) if any(fnmatchcase(short, p) for p in patterns)),
                None)


def test_the_package_has_no_import_circle():
    cycles = _cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/ARCHITECTURE.md): {unplaced}"
    names = list(LAYERS)
    upward = sorted(f"{m} ({names[layer(m)]}) -> {t} ({names[layer(t)]})" for m, targets in graph.items()
                    for t in targets if layer(t) < layer(m))
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_only_the_cli_and_the_demo_import_stages():
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                   if target.startswith("llm2slm_cli.stages.") and name not in RUNS_STAGES)
    assert not wrong, "stages imported by other modules than the CLI and the demo:\n" + "\n".join(wrong)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: a circle made only by imports inside functions, one relative, is found."""
    pkg = tmp_path / "llm2slm_cli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from llm2slm_cli.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from .. import a\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        graph = import_graph()
    finally:
        PACKAGE = saved
    assert graph["llm2slm_cli.a"] == {"llm2slm_cli.sub.b"}
    assert graph["llm2slm_cli.sub.b"] == {"llm2slm_cli.a"}
    assert _cycles(graph) == [["llm2slm_cli.a", "llm2slm_cli.sub.b", "llm2slm_cli.a"]]


def test_configs_depend_only_on_the_error_types():
    """Options are checked without models: config.py imports no other module of the package than errors.py."""
    assert import_graph()["llm2slm_cli.config"] == {"llm2slm_cli.errors"}


# the model code: these import torch at module level, and so does whatever imports them at module level; and the
# model code an export carries for transformers (torch and transformers, nothing of this package)
TORCH_AT_IMPORT = {"llm2slm_cli.checkpoint", "llm2slm_cli.continuous", "llm2slm_cli.cpu_head", "llm2slm_cli.decoding",
                   "llm2slm_cli.int8_linear",
                   "llm2slm_cli.kd", "llm2slm_cli.llm2slm", "llm2slm_cli.remote_code.configuration_llm2slm",
                   "llm2slm_cli.remote_code.modeling_llm2slm"}


def test_only_the_model_code_imports_torch_when_imported():
    """Why some of the package's own imports sit inside functions: importing any other module (the CLI, a stage,
    the API, the server, the bench library) leaves torch and transformers unimported, so `llm2slm --help`, option
    errors and `import llm2slm_cli` stay light. Each such import says so in a comment."""
    import json
    import subprocess
    import sys

    light = sorted(set(_modules()) - TORCH_AT_IMPORT)
    code = ("import importlib, json, sys\n"
            f"for name in {light!r}:\n"
            "    importlib.import_module(name)\n"
            "light = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            f"for name in {sorted(TORCH_AT_IMPORT)!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps([light, 'torch' in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    heavy_after_light, torch_after_model = json.loads(result.stdout)
    assert heavy_after_light == [] and torch_after_model


def test_imports_of_torch_code_inside_functions_give_their_reason():
    """A function-level import of the package's own modules is there only to keep torch off a module's import; the
    line (or the comment above it) says so."""
    modules = _modules()
    missing = []
    for name, path in modules.items():
        if name in TORCH_AT_IMPORT:
            continue
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if node is fn or not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                own = (node.level > 0 or (node.module or "").startswith("llm2slm_cli")
                       if isinstance(node, ast.ImportFrom) else node.names[0].name.startswith("llm2slm_cli"))
                if not own:
                    continue
                said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not said:
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert missing == []


def test_the_model_code_an_export_carries_imports_nothing_of_the_package():
    """remote_code's two files are copied into exports and run where llm2slm may not be installed: they import each
    other (relatively, as transformers' remote code does) and outside packages, never llm2slm_cli."""
    files = {name: path for name, path in _modules().items() if name.startswith("llm2slm_cli.remote_code.")}
    assert set(files) == {"llm2slm_cli.remote_code.configuration_llm2slm", "llm2slm_cli.remote_code.modeling_llm2slm"}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "llm2slm_cli" for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "llm2slm_cli", name
                assert node.level in (0, 1), name  # a sibling file, nothing above the copied directory
