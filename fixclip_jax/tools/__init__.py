"""Command-line tools around the library: benchmarks and the captioning client."""
