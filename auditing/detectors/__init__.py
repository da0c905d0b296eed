"""Detectors: one verb, ``detect(images)``, a result per image that keeps raw scores.

Named by string in configs and on the command line (see ``registry``).
"""
