"""The model contract: what training writes and serving reads, with only numpy and
onnxruntime.

    artifact.py   the artifact directory (model.onnx, vocab.json, labels.json, metadata.json)
    tokenizer.py  text to token ids, the one tokenization training and serving share
    sampler.py    next-token sampling, the one sampler `recur generate` and the server share
    runtime.py    an artifact on ONNX Runtime (CPU or CUDA)

This is the only part of `serving/` that `training/` imports.
"""
