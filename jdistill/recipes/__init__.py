"""Recipes: what `jdistill train / sample / distill` run, one module per kind of experiment.

A recipe module provides ``train(cfg, workdir, progress=True)`` and
``make_sampler(workdir, **options) -> Sampler``; configs name theirs in ``recipe``.
"""

import importlib

RECIPES = {"teacher": "jdistill.recipes.teacher", "guided": "jdistill.recipes.guided"}


def get_recipe(cfg_or_name):
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.get("recipe", "teacher")
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name])
