"""Recipes: one YAML file -> a validated recipe -> a Composer Trainer."""

from composer_growth.recipe.build import ValidRecipe, build_trainer, run, validate
from composer_growth.recipe.loading import load_recipe
from composer_growth.recipe.schema import Recipe

__all__ = ["ValidRecipe", "Recipe", "build_trainer", "load_recipe", "run", "validate"]
