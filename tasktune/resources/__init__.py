"""Bundled data: DU datasets (each with its licence) and a held-out general text."""
