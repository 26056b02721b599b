"""Orchestration above the stages: the steps of a run in order, wrapping outside models, and the CLI.
Takes command-line options; produces a run folder and its bundle. Nothing below imports it.
"""
