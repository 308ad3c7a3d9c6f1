"""Reduced precision on CPU node pools: the quantized graphs, their physics cost, and the gate.

- :mod:`.files`: the names of the quantized graphs and of the admission record, and reading them;
- :mod:`.cpu`: which arithmetic units this CPU has (int8: VNNI/AMX, bf16: AVX512-BF16/AMX);
- :mod:`.graphs`: one exported graph on one runtime at one precision, images -> logits;
- :mod:`.quantize`: the int8 OpenVINO IR (NNCF, accuracy control) and the int8 ONNX QDQ graph;
- :mod:`.scoring`: every precision scored on the test jets against torch fp32;
- :mod:`.gate`: which precisions a version admits, given those numbers and ``max_auc_loss``;
- :mod:`.bundle`: the registered version's folder (model + ``quantized/`` + ``precision.json``) and tags.
"""
