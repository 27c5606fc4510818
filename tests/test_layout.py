"""The package's shape: no import cycles, recipe modules small enough to read in one sitting,
every shipped config's recipe known, and reading a trained run prints no warnings."""

import ast
import os
import pathlib

import pytest

from jdistill import config as config_lib
from jdistill.recipes import RECIPES, get_recipe

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jdistill"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def module_imports() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every import statement (function-level too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                    mod = ".".join(parts + ([mod] if mod else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and not name.startswith(t + "."):
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = module_imports()
    assert len(graph) > 50
    assert cycles(graph) == []
    # the checker finds a cycle when there is one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_recipe_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "recipes").glob("*.py")}
    assert sizes and max(sizes.values()) <= 250, {k: v for k, v in sizes.items() if v > 250}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_names_a_known_recipe(path):
    cfg = config_lib.load_config(str(path))
    recipe = get_recipe(cfg)
    assert recipe.name == cfg.get("recipe", "teacher") and recipe.name in RECIPES
    assert recipe.train is not None or recipe.sample_config is not None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_train_takes_what_the_cli_passes(name):
    """`jdistill train/distill` calls recipe.train(cfg, workdir, progress=, allow_inexact_resume=):
    a recipe without one of them crashed with a TypeError (LCM, CoDi and LADD did)."""
    import importlib
    import inspect

    recipe = importlib.import_module(RECIPES[name]).RECIPE
    if recipe.train is None:
        return
    params = inspect.signature(recipe.train).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes (and refuses by name) anything: the training-free recipes
    assert {"progress", "mesh", "allow_inexact_resume"} <= set(params), f"{name}: {list(params)}"
