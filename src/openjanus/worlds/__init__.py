"""Procedural image worlds the project trains and evaluates on (see ``shapes``)."""
