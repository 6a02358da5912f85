"""The house's one-way layers (docs/ARCHITECTURE.md draws them): every import of project code is read
from the source, and the test fails on an import cycle, on an import that runs up the declared order,
and on a project import inside a function (the exceptions, optional heavy dependencies, are listed
below with their reasons)."""
import ast
import fnmatch
import os
from typing import Dict, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dip_kernels", "dip")

# Lowest first. A module may import modules of its own layer or of a lower one, never a higher one.
# A pattern names modules (fnmatch on the dotted name); every module must match exactly one layer.
DIP_KERNELS_LAYERS = [
    ["dip_kernels._alloc", "dip_kernels.reference", "dip_kernels.reference.*", "dip_kernels.triton.launch"],
    ["dip_kernels.backends"],
    ["dip_kernels.opspec", "dip_kernels.ops.checks", "dip_kernels.plan", "dip_kernels.plan.patch_detailer",
     "dip_kernels.triton"],
    ["dip_kernels.plan.*", "dip_kernels.triton.*", "dip_kernels.cuda", "dip_kernels.cuda.*", "dip_kernels.onednn",
     "dip_kernels.onednn.*", "dip_kernels.ops.*"],
    ["dip_kernels.ops"],
    ["dip_kernels", "dip_kernels.testing", "dip_kernels.precompile"],
]
DIP_LAYERS = [
    ["dip", "dip.errors"],
    ["dip.models", "dip.data", "dip.diffusion", "dip.flops"],
    ["dip.checkpoint"],               # the checkpoint format, and a model from a checkpoint
    ["dip.distributed", "dip.run_folder"],
    ["dip.ema", "dip.sample", "dip.sharded_checkpoint"],
    ["dip.graph_sampler", "dip.evaluate", "dip.official"],
    ["dip.train.config", "dip.train.preemption"],
    ["dip.train.step"],
    ["dip.train.trainer"],
    ["dip.train.run"],
    ["dip.train"],
    ["dip.demo", "dip.demo.*", "dip.precompile", "dip.recipes"],
    ["dip.docs"],
    ["dip.cli"],
]
LAYERS = DIP_KERNELS_LAYERS + DIP_LAYERS
# compiled modules: no source to read, they import nothing of ours; below every layer
EXTENSION_MODULES = {"dip_kernels._C": -1}

# (module, imported module): project imports that may stay inside a function, and why.
FUNCTION_IMPORTS_ALLOWED = {
    # the compiled extension is optional: the package imports, and its reference and Triton backends
    # run, without it; it is imported where the CUDA backend's availability is decided
    ("dip_kernels.backends", "dip_kernels._C"): "optional compiled extension",
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _sources() -> Dict[str, str]:
    found = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    found[_module_name(path)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(module: str, path: str, modules: Set[str]) -> List[Tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every project import of ``module``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if _project(a.name))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child)
                if not _project(target):
                    continue
                for alias in child.names:  # `from . import x` imports the submodule x when there is one
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _deepest_known(name: str, modules: Set[str]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def layer_of(module: str) -> int:
    if module in EXTENSION_MODULES:
        return EXTENSION_MODULES[module]
    hits = [i for i, layer in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in layer)]
    exact = [i for i, layer in enumerate(LAYERS) if module in layer]
    if exact:
        return exact[0]
    if len(hits) != 1:
        raise AssertionError(f"{module} matches {len(hits)} layers of tests/test_layers.py (must be exactly 1)")
    return hits[0]


def import_graph(sources: Dict[str, str]) -> Dict[str, List[Tuple[str, int, bool]]]:
    modules = set(sources) | set(EXTENSION_MODULES)
    graph = {}
    for module, path in sources.items():
        edges = []
        for target, line, in_function in imports_of(module, path, modules):
            target = _deepest_known(target, modules)
            if target != module and target in modules:
                edges.append((target, line, in_function))
        graph[module] = edges
    return graph


def _is_own_package(module: str, target: str) -> bool:
    """A package's __init__ may import its own submodules (its public face), and a submodule the
    names of an ancestor package that has none of its own: neither is an edge between layers."""
    return target.startswith(module + ".")


def find_cycles(graph) -> List[List[str]]:
    cycles, state, stack = [], {}, []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for target, _, _ in graph.get(node, []):
            if _is_own_package(node, target):
                continue
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                dfs(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return cycles


def violations(sources: Dict[str, str]) -> List[str]:
    graph = import_graph(sources)
    problems = [f"import cycle: {' -> '.join(c)}" for c in find_cycles(graph)]
    for module, edges in sorted(graph.items()):
        for target, line, in_function in edges:
            where = f"{os.path.relpath(sources[module], REPO)}:{line}"
            if module.startswith("dip_kernels") and target.split(".")[0] == "dip":
                problems.append(f"{where}: {module} imports {target}: the kernel package never imports the model's")
            elif not _is_own_package(module, target) and layer_of(target) > layer_of(module):
                problems.append(f"{where}: {module} (layer {layer_of(module)}) imports {target} "
                                f"(layer {layer_of(target)}), above it")
            if in_function and (module, target) not in FUNCTION_IMPORTS_ALLOWED:
                problems.append(f"{where}: {module} imports {target} inside a function")
    return problems


def test_every_module_has_one_layer():
    for module in _sources():
        layer_of(module)


def test_imports_run_one_way():
    problems = violations(_sources())
    assert not problems, "\n".join(problems)


def test_a_planted_back_import_fails(tmp_path):
    """The check sees what it must: a model module importing the CLI (a cycle and an upward import),
    and a project import inside a function."""
    sources = _sources()
    planted = tmp_path / "models.py"
    with open(sources["dip.models"]) as f:
        text = f.read()
    planted.write_text(text + "\n\nfrom .cli import main as _planted\n\n\ndef _late():\n    from . import sample\n")
    problems = violations({**sources, "dip.models": str(planted)})
    joined = "\n".join(problems)
    assert "import cycle" in joined and "dip.models" in joined
    assert "imports dip.cli (layer" in joined
    assert "imports dip.sample inside a function" in joined


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_in_the_model_package_is_over_80_lines(package):
    """Functions stay readable: at most 80 lines each in dip/ (the kernel package's Triton kernels are
    exempt: a kernel is one launch, not to be split)."""
    if package != "dip":
        pytest.skip("only dip/ is held to it")
    long = []
    for module, path in _sources().items():
        if not module.startswith("dip.") and module != "dip":
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
