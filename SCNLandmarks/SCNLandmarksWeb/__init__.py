"""The browser face of the SCNLandmarks module: `scn-landmarks serve` (needs the `web` extra)."""
