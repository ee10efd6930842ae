"""Notebook-first pipeline: stage parameters, progress, plots, and the papermill runner."""
