"""Scoring (model, adapter) pairs for unsafe content, and the model layer everything shares.

``auditing.models`` is the one place that loads pipelines, builds tiny ones, hashes
weights and defines the denoising loss; ``auditing.shapes`` is the miniature world
the whole project is exercised on. Nothing here imports ``gate`` or ``alignment``.
"""
