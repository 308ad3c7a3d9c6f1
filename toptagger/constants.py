"""Names and numbers that several parts of the system must agree on, written once.

The manifests (YAML) spell some of them too; ``tests/manifests`` checks those against these.
"""

from __future__ import annotations

from pathlib import Path

# The registered model, the served model and the experiment of the pipeline's runs.
MODEL_NAME = "top-tagger"
EXPERIMENT = "top-tagging"
# Registry aliases: every new version is the challenger; the promotion gate moves the champion.
CHALLENGER, CHAMPION = "challenger", "champion"
CHAMPION_URI = f"models:/{MODEL_NAME}@{CHAMPION}"
# The one served version, as Triton names versions (SONIC asks for "" or "1").
MODEL_VERSION = "1"

# KServe's ports: REST and gRPC (h2c) of the predictor container.
HTTP_PORT, GRPC_PORT = 8080, 8081

# Constituent slots per jet in the reference format (pT-ordered, zero-padded); (E, px, py, pz) each.
N_CONSTITUENTS = 200
FOUR_VECTOR = ("E", "px", "py", "pz")

# Jet image size in pixels unless a run chooses one: the one default of ImageConfig, jet_images,
# the training and tagger configs and the pipeline's image_size. 40 trains in minutes on a few CPU
# cores (make demo); full-scale runs choose the paper's 224 (toptagger.images.PAPER_IMAGE_SIZE).
IMAGE_SIZE = 40

# The kustomize overlays of the InferenceService (manifests/overlays/<overlay>): one per node pool.
OVERLAYS = ("cpu", "gpu", "fpga")

# Downloads (S3 objects, registered models) and compiled kernels are cached under here.
CACHE_ROOT = Path.home() / ".cache" / "top-tagger"
