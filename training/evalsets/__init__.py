"""Labelled evaluation sets (real photos) for the trainers' evaluation commands."""
