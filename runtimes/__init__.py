"""Runtimes: one step interface over eager, ONNX Runtime (and more), one generation loop on top.

Nothing here imports the model code for ORT; the manifest is the contract.
"""
