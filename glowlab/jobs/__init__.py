"""Jobs run on trained checkpoints: bits/dim, FID, samples, interpolation, attribute manipulation."""
