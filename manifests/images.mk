# Container images: build and push the pipeline-components image and the two predictor images.
# Include from the top-level Makefile (`include manifests/images.mk`) or run directly:
#   make -f manifests/images.mk images REGISTRY=ghcr.io/you/top-tagger TAG=0.1.0
#   make -f manifests/images.mk push-images REGISTRY=ghcr.io/you/top-tagger TAG=0.1.0
# Then point the overlays at them: the `images:` block of manifests/overlays/*/kustomization.yaml.
# Build context is the repository root, so run it from there.

REGISTRY ?= registry.example.com/top-tagger
TAG ?= 0.1.0
# docker or podman, whichever is installed; override with CONTAINER_ENGINE=...
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
# Your FPGA vendor's runtime image (an EXAMPLE default; see serving/Dockerfile.fpga).
VENDOR_RUNTIME_IMAGE ?= xilinx/xilinx_runtime_base:alveo-2022.2-ubuntu-22.04
PLATFORM ?= linux/amd64

COMPONENTS_IMAGE := $(REGISTRY)/components:$(TAG)
PREDICTOR_IMAGE := $(REGISTRY)/predictor:$(TAG)
PREDICTOR_FPGA_IMAGE := $(REGISTRY)/predictor-fpga:$(TAG)

.PHONY: images push-images image-names check-engine

check-engine:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "no container engine: install docker or podman (or set CONTAINER_ENGINE=...) to build images;" >&2; \
	  echo "the Dockerfiles are components/Dockerfile, serving/Dockerfile, serving/Dockerfile.fpga" >&2; \
	  exit 1; fi
	@if ! $(CONTAINER_ENGINE) info >/dev/null 2>&1; then \
	  echo "$(CONTAINER_ENGINE) is installed but cannot reach its engine (is the docker daemon / podman running?)" >&2; \
	  exit 1; fi
	@if [ "$(TAG)" = "latest" ] || [ -z "$(TAG)" ]; then \
	  echo "TAG must be a fixed version (e.g. 0.1.0), not '$(TAG)'" >&2; exit 1; fi

images: check-engine  ## build the components, predictor and predictor-fpga images
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) -f components/Dockerfile \
	  --build-arg CODE_VERSION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) -t $(COMPONENTS_IMAGE) .
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) -f serving/Dockerfile -t $(PREDICTOR_IMAGE) .
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) -f serving/Dockerfile.fpga \
	  --build-arg VENDOR_RUNTIME_IMAGE=$(VENDOR_RUNTIME_IMAGE) -t $(PREDICTOR_FPGA_IMAGE) .

push-images: images  ## build, then push the three images to $(REGISTRY)
	$(CONTAINER_ENGINE) push $(COMPONENTS_IMAGE)
	$(CONTAINER_ENGINE) push $(PREDICTOR_IMAGE)
	$(CONTAINER_ENGINE) push $(PREDICTOR_FPGA_IMAGE)

image-names:  ## print the image references that `images` builds
	@echo $(COMPONENTS_IMAGE); echo $(PREDICTOR_IMAGE); echo $(PREDICTOR_FPGA_IMAGE)
