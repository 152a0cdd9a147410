"""Evaluation: labelled data-set readers, the paper's metrics, and ``msld eval``."""
