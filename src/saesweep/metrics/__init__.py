"""Metrics: :mod:`.reconstruction`
(held-out activations), :mod:`.downstream` (the LM with the SAE spliced in)."""
