"""Stability across seeds: optimal one-to-one assignment of latents and the matching of dictionaries."""
