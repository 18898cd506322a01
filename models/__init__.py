"""Generative methods, each one PyroModule with ``model(x)`` and ``guide(x)``."""
