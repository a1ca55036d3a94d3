"""Shared plain data and utilities: the model config, the statistics table, errors, files, phase lines, the compile cache."""
