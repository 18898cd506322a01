"""Algorithms that take probabilistic programs, score functions and SDEs."""
