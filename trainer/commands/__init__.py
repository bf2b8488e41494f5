"""Thin command modules behind `python -m trainer COMMAND` (each `main(argv) -> int`)."""
