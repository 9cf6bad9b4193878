"""Does a policy fit a model version's signature? Used by `gateway policy check` and at load time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.card import ScoreSpec, Signature, TensorSpec
from gateway.fallback import choices_problems
from gateway.policy import FeatureSpec, FeatureType, Policy
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


def policy_misfits(policy: Policy, signature: Signature, score: ScoreSpec | None = None) -> list[Misfit]:
    """Every disagreement between the policy and a version: inputs, fallback outputs, score band."""
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
    return found + _fallback_misfits(policy, signature, score) + _batching_misfits(policy, signature)


def _batching_misfits(policy: Policy, signature: Signature) -> list[Misfit]:
    """Batching stacks requests along the first dimension, so every tensor must have a variable one."""
    if policy.batching is None:
        return []
    fixed = [f"{t.name} {t.shape}" for t in (*signature.inputs, *signature.outputs) if not t.shape or t.shape[0] != -1]
    ragged = [f"{t.name} {t.shape}" for t in signature.inputs if -1 in t.shape[1:]]
    found = []
    if fixed:
        found.append(Misfit(("batching",), "batching needs a variable first (batch) dimension on every input and "
                                           f"output; fixed: {', '.join(fixed)}"))
    if ragged:
        found.append(Misfit(("batching",), "batching needs fixed dimensions after the first on every input "
                                           f"(requests of different widths cannot be stacked); variable: "
                                           f"{', '.join(ragged)}"))
    return found


def _fallback_misfits(policy: Policy, signature: Signature, score: ScoreSpec | None) -> list[Misfit]:
    fallback = policy.fallback
    if fallback is None:
        return []
    found = []
    choices: list[tuple[object, Mapping[str, object]]] = [
        (("fallback", "rules", i, "output"), rule.output) for i, rule in enumerate(fallback.rules)]
    choices.append((("fallback", "default"), fallback.default))
    for key, name, message in choices_problems(choices, signature.outputs):
        loc = key if isinstance(key, tuple) else ("fallback",)
        found.append(Misfit((*loc, name) if name in dict(choices)[key] else loc, message))
    if fallback.low_confidence is not None:
        loc = ("fallback", "low_confidence")
        outputs = {t.name: t for t in signature.outputs}
        if score is None:
            found.append(Misfit(loc, "the model card names no `score` output, so there is no score to band"))
        elif score.output not in outputs:
            found.append(Misfit(loc, f"the card's score output {score.output!r} is not a model output"))
        else:
            width = outputs[score.output].shape[1:]
            size = width[0] if len(width) == 1 else 1 if not width else -1
            index = score.index or 0
            if size == -1 or not 0 <= index < max(size, 1) or len(width) > 1:
                found.append(Misfit(loc, f"the card's score {score.output}[{index}] does not fit that output's "
                                         f"per-row shape {width}"))
    return found


def feature_signature(features: Mapping[str, FeatureSpec]) -> Signature:
    """A signature that carries the policy's features as they are (for validating without a model)."""
    kinds = {"float": "FP64", "int": "FP64", "bool": "FP64", "category": "BYTES", "string": "BYTES"}
    inputs = [TensorSpec(name=spec.input or name, datatype=kinds[spec.type], shape=[-1, 1])
              for name, spec in features.items()]
    return Signature(inputs=inputs, outputs=[])
