"""nnrt's modules import each other without a cycle (issue 17, item 5).

The reference is the package's own source, read with ``ast``: every ``import`` and
``from ... import`` anywhere in a module counts (function bodies and
``TYPE_CHECKING`` blocks included: a reader, and a refactoring, sees them too),
and the plain import lines of the ``.pyx`` files. Edges to the package itself
(``import nnrt``) are left out: ``nnrt/__init__.py`` imports the public names of
every module, so each import of the package would close a trivial loop.

Also checked: ``nnrt.network.Sequential`` is still the class users hold, whoever
builds it (``nnrt.load``, ``nnrt.from_torch``, ``net.fold()``), and a pickle that
names its helpers by their path before the split into ``nnrt._network`` loads.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt

PKG = Path(nnrt.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*")):
        if path.suffix not in (".py", ".pyx") or "build" in path.relative_to(PKG).parts:
            continue
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        src = path.read_text(encoding="utf-8")
        if path.suffix == ".pyx":  # cimport/cdef lines are not Python: keep the imports
            src = "\n".join(
                line.strip()
                for line in src.splitlines()
                if line.lstrip().startswith(("import ", "from ")) and " cimport " not in line
            )
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # nnrt.io.load -> nnrt.io
                    target = target.rpartition(".")[0]
                if target and target not in (mod, "nnrt"):
                    graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    # the checker itself: a two-module loop and a three-module loop, one acyclic tail
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = _import_graph()
    # nnrt.network imports nnrt.engine at module level; nnrt.engine imports
    # nnrt._network only under TYPE_CHECKING: both are edges
    assert "nnrt.engine" in graph["nnrt.network"]
    assert "nnrt._network" in graph["nnrt.engine"]


def test_no_import_cycle_among_nnrt_modules() -> None:
    cycles = _cycles(_import_graph())
    assert cycles == [], "import cycles among nnrt's modules: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


@pytest.mark.parametrize("mod", ["engine", "io", "fold", "interop", "summary", "onnx"])
def test_modules_working_on_networks_do_not_import_network(mod: str) -> None:
    assert "nnrt.network" not in _import_graph()[f"nnrt.{mod}"]


def _net() -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 5, 4),
            nnrt.layer("batchnorm", 4),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 4, 3),
        ],
        seed=3,
    )


def test_networks_built_below_network_are_sequential(tmp_path: Path) -> None:
    net = _net()
    assert nnrt.Sequential is nnrt.network.Sequential
    path = tmp_path / "m.npz"
    net.save(path)
    for built in (nnrt.load(path), nnrt.io.load(path), net.fold(), nnrt.fold.fold(net)):
        assert type(built) is nnrt.Sequential
        assert callable(built.fit) and callable(built.save)


def test_load_builds_a_subclass_of_sequential_as_sequential(tmp_path: Path) -> None:
    class Mine(nnrt.Sequential):
        pass

    net = Mine([nnrt.layer("dense", 3, 2)], seed=0)
    net.save(tmp_path / "m.npz")
    back = nnrt.load(tmp_path / "m.npz")  # the file records layers, not a Python class
    assert type(back) is nnrt.Sequential
    np.testing.assert_array_equal(back.params()["0.weight"], net.params()["0.weight"])


class _Shift(nnrt.Layer):
    """A registered Python layer with a buffer: it pickles as config + arrays, rebuilt
    by a helper whose path a pickle stores by name."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.in_features = n
        self.out_features = n
        self.shift = np.zeros(n)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return np.asarray(self.prepare_input(X)) + self.shift

    def backward(self, dY: Any) -> np.ndarray:
        return np.asarray(dY)

    def params(self) -> dict[str, np.ndarray]:
        return {}

    def grads(self) -> dict[str, np.ndarray]:
        return {}

    def buffers(self) -> dict[str, np.ndarray]:
        return {"shift": self.shift}

    def config(self) -> dict[str, Any]:
        return {"n": int(self.shift.shape[0])}

    def to_dtype(self, dtype: Any) -> None:
        self.shift = self.shift.astype(dtype)
        self.dtype = np.dtype(dtype)


class _ShiftPlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("import_graph_shift", _Shift)


def test_pickle_naming_the_old_module_path_loads() -> None:
    if "import_graph_shift" not in nnrt.available_layers():
        nnrt.register_plugin(_ShiftPlugin(), name="import-graph-shift")
    net = nnrt.Sequential(
        [
            nnrt.layer("dense", 3, 4),
            nnrt.layer("import_graph_shift", 4),
            nnrt.layer("dense", 4, 2),
        ],
        seed=1,
    )
    net.buffers()["1.shift"][:] = [0.5, -1.0, 2.0, 0.25]
    data = pickle.dumps(net, protocol=0)  # text opcodes: module paths are plain lines
    new, old = b"nnrt._network\n_rebuild_layer\n", b"nnrt.network\n_rebuild_layer\n"
    assert new in data
    back = pickle.loads(data.replace(new, old))
    assert type(back) is nnrt.Sequential
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.testing.assert_array_equal(back.predict(X), net.predict(X))
    np.testing.assert_array_equal(back.buffers()["1.shift"], [0.5, -1.0, 2.0, 0.25])


def test_set_network_class_checks_its_argument() -> None:
    from nnrt import _network

    with pytest.raises(TypeError, match="not a subclass of Network"):
        _network.set_network_class(dict)  # type: ignore[arg-type]
    assert _network.build([nnrt.layer("dense", 2, 2)], seed=0, dtype="float64").__class__ is (
        nnrt.Sequential
    )
