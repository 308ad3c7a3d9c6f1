"""Fixtures of the manifest tests: the real CRD schemas beside the checkout."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.manifests.test_manifests import KSERVE_KINDS, SCHEMAS


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"KServe CRD schemas not found at {SCHEMAS} (expected ../shared/schemas beside the checkout)")
    schemas = {}
    for kind, plural in KSERVE_KINDS.items():
        crd = yaml.safe_load((SCHEMAS / f"kserve-crd-{plural}.yaml").read_text())
        for version in crd["spec"]["versions"]:
            schemas[f"{crd['spec']['group']}/{version['name']}/{kind}"] = version["schema"]["openAPIV3Schema"]
    return schemas
