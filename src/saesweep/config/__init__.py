"""Configuration, torch-free: one experiment (:mod:`.experiment`) and the sweep spec with its grids
(:mod:`.sweep`)."""
