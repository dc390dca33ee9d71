"""The feature browser: per-condition feature records (:mod:`.records`) and the static site (:mod:`.site`)."""
