"""The house's import rules, read from the source (every `import`, also those inside functions):

- no import circle between the project's modules (a lazy import inside a function still ties two modules
  together: it only hides the circle until the day someone moves it to the top);
- model code is architecture only: `mmrope/model/` imports nothing from training, evaluation or data, nothing
  from `mmrope.distributed` (parallelism is applied to the model from outside) and no DeepSpeed;
- `mmrope/encodings` is pure torch: no transformers, DeepSpeed or data;
- `data` knows no model and no trainer: it imports nothing from `mmrope.model` or `mmrope.train`;
- `mmrope.eval` knows exports, not the trainer: it imports nothing from `mmrope.train` (a training checkpoint is
  exported by `python -m mmrope.train.export` in a subprocess first).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("mmrope", "data")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in `path` (`from a.b import c` counts as a.b, or a.b.c if a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in modules:  # a.b.c (a name in a.b) -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    # sanity: known edges are seen, also from imports inside functions
    assert "mmrope.encodings" in graph["mmrope.model.install"]
    assert "mmrope.train.eval" in graph["mmrope.train.run"]  # a lazy import inside build_session


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_code_imports_no_training_evaluation_or_data():
    graph = import_graph()
    bad = {
        (name, dep)
        for name, deps in graph.items()
        if name.startswith("mmrope.model")
        for dep in deps
        if dep.startswith(("mmrope.train", "mmrope.eval", "data"))
    }
    assert not bad, sorted(bad)


def external_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in `path` (inside functions too): `deepspeed`, ..."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_model_code_is_single_device():
    """No DeepSpeed and no parallelism technique in `mmrope/model`, not even lazily: `parallelize` applies them."""
    deepspeed = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "mmrope" / "model").rglob("*.py"))
        if "deepspeed" in external_imports(p)
    ]
    assert not deepspeed, f"mmrope/model imports deepspeed: {deepspeed}"
    assert not forbidden_edges(import_graph(), "mmrope.model", ("mmrope.distributed",))


def test_the_deepspeed_rule_can_fail(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from deepspeed.sequence.layer import _SeqAllToAll\n    import torch\n")
    assert external_imports(lazy) == {"deepspeed", "torch"}


def forbidden_edges(
    graph: dict[str, set[str]], importer: str, imported: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(module, dependency) pairs where a module of package `importer` imports one of `imported` (lazily too)."""
    return sorted(
        (name, dep)
        for name, deps in graph.items()
        if name == importer or name.startswith(importer + ".")
        for dep in deps
        if any(dep == p or dep.startswith(p + ".") for p in imported)
    )


def test_data_imports_no_model_and_no_trainer():
    assert not forbidden_edges(import_graph(), "data", ("mmrope.model", "mmrope.train"))


def test_eval_imports_no_trainer():
    assert not forbidden_edges(import_graph(), "mmrope.eval", ("mmrope.train",))


def test_the_rules_can_fail():
    """The same check on a graph with the edges the rules forbid (a lazy import counts like any other)."""
    graph = {
        "data.processor": {"mmrope.model.config"},
        "mmrope.eval.probe": {"mmrope.train.export", "mmrope"},
    }
    assert forbidden_edges(graph, "data", ("mmrope.model", "mmrope.train")) == [
        ("data.processor", "mmrope.model.config")
    ]
    assert forbidden_edges(graph, "mmrope.eval", ("mmrope.train",)) == [
        ("mmrope.eval.probe", "mmrope.train.export")
    ]
    assert forbidden_edges({"mmrope.evaluation": {"mmrope.train"}}, "mmrope.eval", ("mmrope.train",)) == []


def test_encodings_are_pure_torch():
    for path in (ROOT / "mmrope" / "encodings").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        heavy = [n for n in names if n.split(".")[0] in ("transformers", "deepspeed", "data")]
        heavy += [
            n for n in names if n.startswith(("mmrope.", "mmrope")) and not n.startswith("mmrope.encodings")
        ]
        assert not heavy, (path, heavy)


def test_the_lmms_eval_entry_point_is_light():
    """lmms-eval loads every entry point whenever it lists models: ours imports only lmms-eval's registry."""
    tree = ast.parse((ROOT / "mmrope" / "eval" / "lmms_entry.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    assert set(names) <= {"__future__", "lmms_eval.models.registry_v2"}, names
