"""Evaluation, generation and routing analysis."""
