"""Data: corpus chunks, the packed token store and the run's sample order (docs/data.md); no Ray."""
