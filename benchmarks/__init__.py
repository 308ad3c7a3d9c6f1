"""The benchmarks: scripts that measure, each a CLI whose output tables are recorded in docs/.

Not tests: the shared 2-core machines are too noisy for timed assertions. Each measures ratios
within one run (ours against an in-process bound or a real peer), and the tables say which
command produced them: ``data`` (generation, streaming reads), ``ml`` (images, the training
loader), ``physics`` (network against the mass window), ``serving`` (``python -m benchmarks.serving``:
our server against the in-process ceiling and stock KServe, whose peer is ``stock_kserve``),
``opencl`` and ``opencl_accuracy`` (the OpenCL engine's speed and precision study).
"""
