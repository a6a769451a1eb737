"""Recipes that run the engine to decide something before training: auto (which recipe) and lr_find
(which LR)."""
