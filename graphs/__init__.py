"""Step graphs of a static Mixtral: ONNX export, manifests, engine builds.

Importing this package must not import torch: runtimes read `graphs.contract` and
`graphs.manifest` to serve artifacts without it.
"""
