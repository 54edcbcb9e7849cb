"""Build: a checkpoint to an artifact (ONNX step and head graphs, AOTInductor packages, TensorRT
engines), written atomically and described by a manifest (`mixtral_export.artifact`).
"""
