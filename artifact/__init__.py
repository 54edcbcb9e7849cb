"""The artifact contract, a leaf every other layer reads: the model's config, the step's shapes and
I/O names, dtypes and weight schemes, the manifest and how its files are hashed.

Imports nothing of the project but `mixtral_export.errors`, and never torch when imported (only
engine_record's GPU probe asks torch, when called): the ORT path serves an artifact with this
package, numpy and onnxruntime alone.
"""
