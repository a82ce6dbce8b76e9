"""Metrics: :mod:`.registry` (names, directions, labels; torch-free), :mod:`.reconstruction`
(held-out activations), :mod:`.downstream` (the LM with the SAE spliced in)."""
