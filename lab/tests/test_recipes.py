"""Every recipe the README and the recipes' own comments point to loads as a training config: a key
renamed in `TrainConfig` or a typo in a recipe fails here, not an hour into someone's run."""

from pathlib import Path

import pytest

from palikit.train.config import TrainConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_the_recipes_folder_is_found():
    assert len(RECIPES) >= 6, RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_as_a_training_config(recipe):
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.output_dir and cfg.model
    assert cfg.train_data or cfg.train_source, f"{recipe.name}: no training data"


def test_the_frozen_mix_recipe_streams_with_the_tower_fixed():
    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "recipes" / "demo-v2-stream-frozen.yaml")
    assert cfg.freeze_vision and cfg.train_source == "lab.demo.stream:shapes2_source" and cfg.mask_codec
