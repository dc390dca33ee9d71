"""Judges of explanations and steered text: the OpenAI-compatible client and its cache, the prompts
and their strict parsers, the explainer/scorer backends, and the offline embedding judge."""
