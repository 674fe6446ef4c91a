"""Recipes: one YAML file -> a validated plan -> a Composer Trainer."""

from composer_growth.recipe.build import Plan, build_trainer, load_recipe, run, validate
from composer_growth.recipe.schema import Recipe

__all__ = ["Plan", "Recipe", "build_trainer", "load_recipe", "run", "validate"]
