"""The file names of a training run: its run folder and the export it hands on (no heavy imports).

A run folder (``--out``, or a checkpoint folder) holds ``checkpoint.pt``, ``model/`` (the best
epoch's tagger) and ``training.json``; the export adds ``state_dict.pt`` and, inside ``model/``,
the ONNX graph and the ``opencl/`` package; a job's export also has ``summary.json`` beside it.
"""

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
HISTORY_FILE = "training.json"
STATE_DICT_FILE = "state_dict.pt"
OPENCL_DIR = "opencl"
OPENCL_PRECISIONS = ("fp32",)  # the precisions of the OpenCL package in the export
# Beside a job's export (--export-to): the trainer summary, world size, training seconds, resumed.
SUMMARY_FILE = "summary.json"
