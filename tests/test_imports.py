"""The import graph of pistill's own modules (every `import` / `from` statement, at module level and inside
functions, read with ast): no cycles, and the spine does not import the device side."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGES = ("pistill", "pistill.compress", "pistill.export", "pistill.device")
SUBPACKAGES = PACKAGES[1:]  # the spine is every other pistill module
SPINE_DEVICE_ALLOWED = {  # (spine module, device module): the spine's imports of device/ that remain, and why
    ("pistill.cli", "pistill.device.doctor"): "`pistill doctor` is a command of the CLI, which reaches every part",
    ("pistill.cli", "pistill.device.target"): "`pistill doctor` and `pistill trust` connect to a device",
    ("pistill.cli", "pistill.device.deploy"): "`pistill deploy`, `status` and `undeploy` are commands of the CLI",
    ("pistill.evaluate", "pistill.device.runtimes"): "perplexity of GGUF / ONNX files runs in the runtimes the agent "
                                                     "ships to the Pi (runtimes.py must sit beside agent.py)",
    ("pistill.mc_eval", "pistill.device.runtimes"): "zero-shot scoring of GGUF / ONNX files, the same runtimes",
}
CYCLE_EDGES_ALLOWED = {  # (importer, imported): edges that close the cycles that remain, and why they are not cut yet
}


def modules() -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is a package)} for every module of the four packages."""
    found = {}
    for pkg in PACKAGES:
        folder = Path(importlib.import_module(pkg).__file__).parent
        found[pkg] = (folder / "__init__.py", True)
        for path in sorted(folder.glob("*.py")):
            if path.stem != "__init__":
                found[f"{pkg}.{path.stem}"] = (path, False)
    return found


def imported(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The pistill modules `name` imports anywhere in its file (relative imports resolved)."""
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {_known_prefix(a.name, known) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else _known_prefix(base, known)
                    for a in node.names}
    return out - {None, name}


def _known_prefix(dotted: str, known: set[str]) -> str | None:
    """The longest prefix of a dotted name that is one of pistill's modules, None for anything else."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def graph() -> dict[str, set[str]]:
    """{module: the pistill modules it imports} for every module of the four packages."""
    mods = modules()
    return {name: imported(name, path, is_pkg, set(mods)) for name, (path, is_pkg) in mods.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def is_spine(name: str) -> bool:
    """pistill itself and its own modules, not compress/, export/ or device/."""
    return not any(name == p or name.startswith(p + ".") for p in SUBPACKAGES)


def test_graph_sees_the_packages():
    g = graph()
    assert {"pistill.cli", "pistill.compress.distill", "pistill.export.gguf", "pistill.device.bench"} <= set(g)
    assert "pistill.device.target" in g["pistill.device.transfer"]  # a relative import, resolved
    assert "pistill.artifact" in g["pistill.device.transfer"]  # an absolute one


def reaches(g: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether `goal` is imported from `start`, directly or through other modules."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += g.get(node, ())
    return False


def test_no_import_cycles():
    g = graph()
    for (a, b), why in CYCLE_EDGES_ALLOWED.items():  # each allowed edge still exists and still closes a cycle
        assert b in g[a] and reaches(g, b, a), f"{a} -> {b} no longer closes a cycle; drop it from the allow-list"
    cut = {a: bs - {b for x, b in CYCLE_EDGES_ALLOWED if x == a} for a, bs in g.items()}
    found = cycle(cut)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_spine_does_not_import_the_device_side():
    edges = {(a, b) for a, bs in graph().items() if is_spine(a) for b in bs if b.startswith("pistill.device")}
    assert edges <= set(SPINE_DEVICE_ALLOWED), f"spine imports device/: {sorted(edges - set(SPINE_DEVICE_ALLOWED))}"
    assert set(SPINE_DEVICE_ALLOWED) <= edges, f"no longer imported, drop from the allow-list: " \
                                               f"{sorted(set(SPINE_DEVICE_ALLOWED) - edges)}"
