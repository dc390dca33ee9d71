"""What stages read and write: crash-safe writes, the text corpus, activation shards and their loader,
hold-out selection, SAE checkpoints (SAELens layout) and the digit images."""
