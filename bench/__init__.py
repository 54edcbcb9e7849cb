"""Measurement: `mixtral-export bench` (every runtime against transformers and the machine's memory
bandwidth) and the benchmark scripts behind docs/benchmarks.md, each run as
`python3 -m mixtral_export.bench.NAME`.
"""
