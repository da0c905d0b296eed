"""The shapes world: coloured shapes with captions, a concept detector, a tiny pipeline
trained on them, and the probe sets and datasets later stages consume."""
