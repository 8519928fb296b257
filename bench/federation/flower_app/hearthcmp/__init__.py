"""Flower side of Hearth's bench/federation."""
