"""Does a policy fit a model version's signature? Used by `gateway policy check` and at load time."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.card import Signature
from gateway.policy import FeatureType, Policy
from gateway.tensors import FLOAT_TYPES, INT_TYPES

#: which model input datatypes each policy feature type may feed
COMPATIBLE: dict[FeatureType, frozenset[str]] = {
    "float": FLOAT_TYPES,
    "int": INT_TYPES | FLOAT_TYPES,
    "bool": frozenset({"BOOL"}) | INT_TYPES | FLOAT_TYPES,
    "category": frozenset({"BYTES"}),
    "string": frozenset({"BYTES"}),
}


@dataclass(frozen=True)
class Misfit:
    """One way a policy does not fit a signature; `loc` is the path in the policy file."""

    loc: tuple[str | int, ...]
    message: str
    error: bool = True


def policy_misfits(policy: Policy, signature: Signature) -> list[Misfit]:
    """Every disagreement between the policy's input schema and the model's signature."""
    found: list[Misfit] = []
    inputs = {t.name: t for t in signature.inputs}
    covered: set[str] = set()
    for name, spec in policy.input_schema.features.items():
        loc = ("schema", "features", name)
        target = spec.input or name
        tensor = inputs.get(target)
        if tensor is None:
            where = f"model input {target!r}" if spec.input else "model input of that name"
            found.append(Misfit(loc, f"feature {name!r} has no {where}; inputs are {sorted(inputs)}"))
            continue
        covered.add(target)
        if tensor.datatype not in COMPATIBLE[spec.type]:
            found.append(Misfit((*loc, "type"), f"a {spec.type} feature cannot feed {tensor.datatype} input "
                                                f"{target!r}; compatible types: {sorted(COMPATIBLE[spec.type])}"))
        per_row = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
        if not per_row:
            found.append(Misfit(loc, f"input {target!r} has shape {tensor.shape}; a policy feature describes "
                                     "one value per row ([-1] or [-1, 1])"))
        if (spec.nullable and spec.default is None and tensor.datatype not in FLOAT_TYPES
                and spec.type in ("int", "bool", "float")):
            found.append(Misfit((*loc, "default"), f"nullable feature feeds {tensor.datatype} input {target!r}, "
                                                   "which cannot hold null: give it a default"))
        if not spec.required and not spec.nullable and spec.default is None:
            found.append(Misfit((*loc, "required"), "a feature that is not required must be nullable or have "
                                                    "a default, or a request without it can never pass"))
    for target in sorted(inputs.keys() - covered):
        found.append(Misfit(("schema", "features"), f"model input {target!r} has no feature in the policy; it is "
                                                    "checked against the signature only", error=False))
    return found
