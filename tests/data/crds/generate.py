"""Derive strict JSON Schemas for the KEDA and Prometheus Operator objects genimg deploys.

Source: the cloudcoil model packages on PyPI, which are generated from the projects'
published CustomResourceDefinitions (their ``openAPIV3Schema``):

    cloudcoil-models-keda==2.16.1.0                -> KEDA v2.16.1 CRDs (keda.sh/v1alpha1)
    cloudcoil-models-prometheus-operator==0.80.1.0 -> Prometheus Operator v0.80.1 CRDs
                                                      (monitoring.coreos.com/v1)

(the newest releases of both that install on Python 3.11). Each model's JSON Schema
(pydantic) is tightened to what the API server enforces for a structural CRD with
strict field validation (``kubectl apply`` rejects unknown fields): objects that
declare properties allow no others, ``null`` is not a value, ``apiVersion``, ``kind``,
``metadata`` and ``spec`` are required. Patterns, bounds and required fields come from
the CRDs as they are.

Run in a throwaway environment (it is not a test dependency)::

    python -m venv /tmp/crdgen
    /tmp/crdgen/bin/pip install cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0 \
        cloudcoil-models-prometheus-operator==0.80.1.0
    /tmp/crdgen/bin/python tests/data/crds/generate.py
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
DROP = {"title", "default", "description"}
CHILD_MAPS = ("properties", "$defs", "patternProperties")
CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
CHILD_ONE = ("items", "additionalProperties", "not")


def tighten(node):
    """Strict copy of a JSON Schema node (see the module docstring)."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in DROP}
    for key in CHILD_MAPS:
        if key in out:
            out[key] = {name: tighten(sub) for name, sub in out[key].items()}
    for key in CHILD_ONE:
        if isinstance(out.get(key), dict):
            out[key] = tighten(out[key])
    for key in CHILD_LISTS:
        if key in out:
            subs = [tighten(s) for s in out[key] if s != {"type": "null"}]
            if len(subs) == 1 and key in ("anyOf", "oneOf"):
                del out[key]
                out.update(subs[0])
            else:
                out[key] = subs
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def resource_schema(model, api_version: str, kind: str, source: str) -> dict:
    """The strict schema of one custom resource kind."""
    schema = tighten(model.model_json_schema(by_alias=True, mode="validation"))
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    schema["properties"].pop("status", None)  # written by the controllers, never by us
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{api_version} {kind}, derived by tests/data/crds/generate.py from {source}", **schema}


def main() -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor

    keda = f"cloudcoil-models-keda=={version('cloudcoil-models-keda')}"
    prom = f"cloudcoil-models-prometheus-operator=={version('cloudcoil-models-prometheus-operator')}"
    kinds = [(ScaledObject, "keda.sh/v1alpha1", "ScaledObject", keda),
             (PodMonitor, "monitoring.coreos.com/v1", "PodMonitor", prom),
             (ServiceMonitor, "monitoring.coreos.com/v1", "ServiceMonitor", prom),
             (PrometheusRule, "monitoring.coreos.com/v1", "PrometheusRule", prom)]
    for model, api_version, kind, source in kinds:
        group = api_version.split("/")[0]
        path = HERE / f"{group}_{kind.lower()}.schema.json"
        path.write_text(json.dumps(resource_schema(model, api_version, kind, source), indent=1, sort_keys=True) + "\n")
        print(f"wrote {path.name}")


if __name__ == "__main__":
    main()
