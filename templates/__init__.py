"""Jinja templates for generated native glue code."""
