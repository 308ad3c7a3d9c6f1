"""Everything Triton-specific: its extra gRPC/HTTP methods, its protos, its model repository and process.

- :mod:`serving.triton.extensions`: ``RepositoryIndex``, ``ModelConfig``, ``ModelStatistics``
  served beside KServe's servicer (and as JSON for Triton's HTTP routes);
- :mod:`serving.triton.protos` and :mod:`serving.triton.proto`: Triton's messages beside KServe's;
- :mod:`serving.triton.repository`: a Triton model repository serving the tagger;
- :mod:`serving.triton.model`: the tagger as a model of Triton's Python backend (copied into it);
- :mod:`serving.triton.process`: real ``tritonserver`` as a local process (the conformance oracle).
"""
