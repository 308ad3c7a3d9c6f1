"""Turn plain Kubernetes/KServe manifests (dicts) into the kserve SDK's model objects and back.

The kserve SDK can *serialize* its models (``ApiClient().sanitize_for_serialization``) but cannot
*deserialize* an InferenceService offline: its deserializer only looks in ``kserve.models`` and fails
on the Kubernetes types inside (``V1ObjectMeta``, ``V1Container`` ...). This small deserializer looks
in both model packages. It rejects fields that the SDK does not know, so that a manifest can never
lose a setting silently on its way to the API server.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import kserve.models
import kubernetes.client.models
from kserve import ApiClient

from toptagger.errors import ConfigError

_PRIMITIVES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
# Types that the kserve 0.21 SDK names but does not ship; they are Kubernetes quantities
# (int-or-string on the wire), so the value passes through as it is.
_QUANTITIES = {"V1beta1MetricQuantity"}
_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(([^,]+), (.+)\)$")


def _model_class(name: str) -> type:
    for package in (kserve.models, kubernetes.client.models):
        klass = getattr(package, name, None)
        if klass is not None:
            return klass
    raise ConfigError(f"no kserve or kubernetes model class named {name}")


def from_dict(data: Any, type_name: str, where: str = "") -> Any:
    """Build the SDK object of OpenAPI type ``type_name`` (e.g. ``"V1beta1InferenceService"``) from ``data``."""
    if data is None:
        return None
    if match := _LIST.match(type_name):
        if not isinstance(data, list):
            raise ConfigError(f"{where or '.'}: expected a list, got {type(data).__name__}")
        return [from_dict(item, match.group(1), f"{where}[{i}]") for i, item in enumerate(data)]
    if match := _DICT.match(type_name):
        if not isinstance(data, dict):
            raise ConfigError(f"{where or '.'}: expected a mapping, got {type(data).__name__}")
        return {key: from_dict(value, match.group(2), f"{where}.{key}") for key, value in data.items()}
    if type_name == "object":
        return data
    if type_name in _PRIMITIVES or type_name in _QUANTITIES:
        return data
    if type_name in ("datetime", "date"):
        return data if isinstance(data, datetime.date) else datetime.datetime.fromisoformat(str(data))
    klass = _model_class(type_name)
    if not isinstance(data, dict):
        raise ConfigError(f"{where or '.'}: expected a {type_name} mapping, got {type(data).__name__}")
    json_to_attr = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(json_to_attr))
    if unknown:
        raise ConfigError(f"{where or '.'}: field(s) {', '.join(unknown)} unknown to the {type_name} model")
    kwargs = {
        json_to_attr[key]: from_dict(value, klass.openapi_types[json_to_attr[key]], f"{where}.{key}")
        for key, value in data.items()
    }
    try:
        return klass(**kwargs)
    except ValueError as exc:  # the generated setters validate required fields and enums
        raise ConfigError(f"{where or '.'}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """The JSON-ready dict of an SDK object, as the API client would send it."""
    return ApiClient().sanitize_for_serialization(obj)
