"""Imports point downward only: codecs and wire -> export, runtimes, profiles -> lab -> CLI.

The check reads every module of the installed distribution with ``ast`` (imports inside
functions included), resolves relative imports and ``from pkg import submodule``, and places
each module in a layer by its name, so a new file is checked without being listed here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: bottom to top; a module may import its own layer and the ones below it
LAYERS = ("codecs and wire", "export, runtimes and profiles", "lab", "CLI")
LAYER2 = ("splitedge.export", "splitedge.runtime_edge", "splitedge.runtime_cloud", "splitedge.profiles")


def layer(module: str) -> int:
    last = module.rsplit(".", 1)[-1]
    if module == "splitedge.cli" or last == "cli" or last.endswith("_cli"):
        return 3
    if module == "splitedge.lab" or module.startswith("splitedge.lab."):
        return 2
    if any(module == p or module.startswith(p + ".") for p in LAYER2):
        return 1
    return 0  # splitedge itself, errors, fsutil, wire, codecs


def all_modules() -> dict[str, Path]:
    """Every module of the distribution, name -> source file: the packages pyproject.toml installs,
    imported, and every module in each (a package folder missing from that list fails the test)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found: dict[str, Path] = {}
    for pkg_name in cfg["packages"]:
        pkg = importlib.import_module(pkg_name)
        found[pkg_name] = Path(pkg.__file__)
        for info in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
            spec = importlib.util.find_spec(info.name)
            assert spec is not None and spec.origin, info.name
            if info.ispkg:
                assert info.name in cfg["packages"], f"{info.name} is a package that pyproject.toml does not install"
            else:
                found[info.name] = Path(spec.origin)
    return found


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The splitedge modules that ``source`` (module ``name``) imports, lazily or not."""
    out: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "splitedge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "splitedge":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out.update(subs or {target})
            if len(subs) < len(node.names):
                out.add(target)
    out.discard(name)
    return out


def violations(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    bad = []
    for name, path in sorted(modules.items()):
        for dep in sorted(imports_of(name, path.read_text(), path.name == "__init__.py", known)):
            if dep not in known:
                bad.append(f"{name} imports {dep}, which is no module of the distribution (a wrong relative import?)")
            elif layer(dep) > layer(name):
                bad.append(f"{name} ({LAYERS[layer(name)]}) imports {dep} ({LAYERS[layer(dep)]})")
            elif (dep == "splitedge.lab" or dep.startswith("splitedge.lab.")) and layer(name) != 2:
                bad.append(f"{name} imports {dep}: only splitedge.lab imports lab (the CLI names it lazily)")
    return bad


def test_no_module_imports_from_a_layer_above_its_own():
    modules = all_modules()
    # the walk found the tree, not a stub: every layer and the moved packages are there
    assert {layer(m) for m in modules} == {0, 1, 2, 3}
    assert {"splitedge.wire.protocol", "splitedge.lab.experiment", "splitedge.lab.bench.load"} <= set(modules)
    assert violations(modules) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check is real: a layer-0 module importing a runtime, a runtime importing lab, and a CLI
    importing lab (eagerly or inside a function) are each reported; a downward import is not."""
    cases = {
        "splitedge.codecs.bad": ("from ..runtime_edge import client\n", False),
        "splitedge.wire.bad": ("def f():\n    from splitedge.export import manifest\n", False),
        "splitedge.runtime_cloud.bad": ("from ..lab import launch\n", False),
        "splitedge.export.cli": ("from ..lab.bench import step\n", False),
        "splitedge.lab.ok": ("from .. import codecs\nfrom ..wire import protocol\n", False),
        "splitedge.lab.sub.bad": ("from ..codecs import spec\n", False),  # one dot short: splitedge.lab.codecs
    }
    modules = {}
    for name, (src, _) in cases.items():
        f = tmp_path / (name + ".py")
        f.write_text(src)
        modules[name] = f
    for dep in ("splitedge.runtime_edge.client", "splitedge.export.manifest", "splitedge.lab.launch",
                "splitedge.lab.bench.step", "splitedge.codecs", "splitedge.wire.protocol"):
        f = tmp_path / (dep + ".dep.py")
        f.write_text("")
        modules[dep] = f
    found = violations(modules)
    assert len(found) == 5, found
    for name in ("splitedge.codecs.bad", "splitedge.wire.bad", "splitedge.runtime_cloud.bad", "splitedge.export.cli",
                 "splitedge.lab.sub.bad"):
        assert any(v.startswith(name + " ") for v in found), (name, found)


@pytest.mark.parametrize("name", ["splitedge.runtime_edge.client", "splitedge.runtime_edge.portable_backend"])
def test_the_edge_imports_nothing_of_the_cloud_or_the_exporters_torch_side(name):
    """The edge runs without torch: it may read export's manifest, never the torch-side export or the cloud."""
    modules = all_modules()
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen or m not in modules:
            continue
        seen.add(m)
        p = modules[m]
        todo.extend(imports_of(m, p.read_text(), p.name == "__init__.py", set(modules)))
    heavy = {m for m in seen if m.startswith(("splitedge.runtime_cloud", "splitedge.lab"))
             or m in ("splitedge.export.onnx_export", "splitedge.export.portable", "splitedge.export.split",
                      "splitedge.export.zoo")}
    assert heavy == set()
