"""Base models built offline: the tiny base, the real embedded base; names resolved in one place."""
