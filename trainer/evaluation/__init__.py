"""Evaluation: identity / leakage / retention scores, the best checkpoint, the report."""
