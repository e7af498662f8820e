"""ov2: one console script over the encoder, bridge, benchmarks and reports packages."""
