"""Continual learning over a sequence of tasks (`jaxlearn continual`); see docs/continual.md."""
