"""Helpers for the shared workflows in ``workflows/``: read a UI-format workflow (what drag-and-drop and
Load use), check it against a server's ``/object_info``, convert it to the API format that
``POST /prompt`` takes, and swap in test models and small CPU settings.

Nothing here is a test, and nothing imports ComfyUI: the node schemas come from ``/object_info``
(a dict ``{node type: schema}``), so the same code serves a live server and a saved copy.

UI format in brief: ``nodes`` (``id``, ``type``, ``mode``, ``inputs`` with ``link`` ids,
``outputs`` with ``links``, ``widgets_values``) and ``links`` as
``[link id, origin node, origin slot, target node, target slot, type]``. ``widgets_values`` holds
one value per widget input in schema order (required, then optional, as in ``input_order``), plus
the "control after generate" value (``fixed``/``increment``/``decrement``/``randomize``) right
after every INT input that has ``control_after_generate`` set, or is named ``seed`` or
``noise_seed`` and does not set it to false (the front end's legacy rule), and after a COMBO input
that sets it.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"

NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
"""Front-end-only nodes that carry text and take no part in the prompt."""
REROUTE_TYPES = frozenset({"Reroute"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})
"""The legacy front-end "Primitive" node: it pushes its value into the widget it is linked to."""
VIRTUAL_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf", ".onnx")

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


# --------------------------------------------------------------------------------------------------
# reading


def load_workflow(path: str | Path) -> dict:
    """A UI-format workflow from a .json file (refuses API-format prompts and subgraphs)."""
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(workflow, dict) or "nodes" not in workflow or "links" not in workflow:
        raise ValueError(f"{path}: not a UI-format workflow (no 'nodes'/'links'; an API prompt?)")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise NotImplementedError(f"{path}: subgraphs are not supported")
    return workflow


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


def links_of(workflow: Mapping) -> dict[int, Link]:
    """Links by id; accepts both the list form and the object form of newer front ends."""
    links = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, Mapping):
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"],
                        raw["type"])
        else:
            link = Link(*raw[:6])
        links[link.id] = link
    return links


def nodes_of(workflow: Mapping) -> dict[int, dict]:
    return {node["id"]: node for node in workflow["nodes"]}


# --------------------------------------------------------------------------------------------------
# schemas (entries of /object_info)


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str                    # "COMBO" for option lists
    options: dict
    optional: bool
    choices: tuple | None        # a COMBO's values

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")

    @property
    def has_control(self) -> bool:
        """Whether the front end adds a "control after generate" widget (one more value) after it."""
        if self.type == "INT":
            control = self.options.get("control_after_generate")
            return bool(control) if control is not None else self.name in LEGACY_SEED_NAMES
        if self.type == "COMBO":
            return bool(self.options.get("control_after_generate"))
        return False


def input_specs(schema: Mapping) -> list[InputSpec]:
    """The node's inputs in the front end's order: required, then optional (``input_order`` when given)."""
    specs = []
    declared = schema.get("input") or {}
    order = schema.get("input_order") or {}
    for section in ("required", "optional"):
        inputs = declared.get(section) or {}
        for name in order.get(section) or list(inputs):
            raw = inputs[name]
            kind = raw[0] if isinstance(raw, (list, tuple)) else raw
            options = dict(raw[1]) if isinstance(raw, (list, tuple)) and len(raw) > 1 and raw[1] else {}
            choices = None
            if isinstance(kind, (list, tuple)):
                kind, choices = "COMBO", tuple(kind)
            elif kind == "COMBO":
                choices = tuple(options.get("options") or ())
            specs.append(InputSpec(name, kind, options, section == "optional", choices))
    return specs


def widget_values(node: Mapping, schema: Mapping) -> tuple[dict[str, Any], dict[str, str]]:
    """``({input name: value}, {input name: control after generate})`` of a node's widgets_values.

    Raises ``ValueError`` when the list does not fit the schema (too many values, or a control value
    where none is allowed); values missing at the end take the schema's default, as the front end does.
    """
    raw = node.get("widgets_values")
    widgets = [spec for spec in input_specs(schema) if spec.is_widget]
    if isinstance(raw, Mapping):  # some nodes save a name -> value map
        values = {spec.name: raw[spec.name] for spec in widgets if spec.name in raw}
        return values, {}
    raw = list(raw or [])
    values, controls, i = {}, {}, 0
    for spec in widgets:
        if i < len(raw):
            values[spec.name] = raw[i]
            i += 1
        elif "default" in spec.options:
            values[spec.name] = spec.options["default"]
        else:
            raise ValueError(f"node {node['id']} ({node['type']}): no value for widget '{spec.name}'")
        if spec.has_control and i < len(raw):
            control = raw[i]
            if control not in CONTROL_VALUES:
                raise ValueError(f"node {node['id']} ({node['type']}): '{spec.name}' is followed by "
                                 f"{control!r}, not a control-after-generate value")
            controls[spec.name] = control
            i += 1
    if i != len(raw):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(raw)} widgets_values for {i} widget slots "
                         f"({[s.name for s in widgets]})")
    return values, controls


# --------------------------------------------------------------------------------------------------
# UI -> API


def _source(workflow_nodes: dict[int, dict], links: dict[int, Link], link_id: int | None,
            want_type: str | None) -> Link | None:
    """The link that really feeds an input: through reroutes and bypassed nodes; None when the
    input ends up unconnected (a muted node, a bypassed node with no matching input)."""
    seen = set()
    while link_id is not None:
        if link_id in seen:
            raise ValueError(f"link cycle at {link_id}")
        seen.add(link_id)
        link = links.get(link_id)
        if link is None:
            return None
        origin = workflow_nodes.get(link.origin_id)
        if origin is None:
            return None
        mode = origin.get("mode", MODE_ALWAYS)
        if origin["type"] in REROUTE_TYPES:
            link_id = (origin.get("inputs") or [{}])[0].get("link")
            continue
        if mode == MODE_BYPASS:
            inputs = origin.get("inputs") or []
            kind = want_type or link.type
            candidates = []
            if link.origin_slot < len(inputs) and inputs[link.origin_slot].get("type") == kind:
                candidates.append(inputs[link.origin_slot])
            candidates += [inp for inp in inputs if inp.get("type") == kind]
            link_id = next((inp.get("link") for inp in candidates if inp.get("link") is not None), None)
            continue
        if mode == MODE_NEVER:
            return None
        return link
    return None


def to_api(workflow: Mapping, object_info: Mapping[str, Mapping]) -> dict[str, dict]:
    """The API-format prompt the front end's "Queue" sends for this workflow.

    Notes and reroutes are dropped, muted nodes (mode 2) with them; links are followed through
    reroutes and bypassed nodes (mode 4); widget values are mapped onto the schema's widget inputs
    (the control-after-generate values are skipped); a linked widget input gets the link; an input
    fed by a legacy Primitive node keeps its own widget value (the primitive copied it there).
    ``_meta.title`` is the node's title when it has one.
    """
    nodes, links = nodes_of(workflow), links_of(workflow)
    prompt: dict[str, dict] = {}
    for node in sorted(workflow["nodes"], key=lambda n: (n.get("order", 0), n["id"])):
        kind = node["type"]
        if kind in VIRTUAL_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: unknown node type {kind!r}")
        schema = object_info[kind]
        values, _controls = widget_values(node, schema)
        slots = {inp["name"]: inp for inp in node.get("inputs") or []}
        inputs: dict[str, Any] = {}
        for spec in input_specs(schema):
            slot = slots.get(spec.name)
            link = None
            if slot is not None and slot.get("link") is not None:
                link = _source(nodes, links, slot["link"], slot.get("type"))
            if link is not None and nodes[link.origin_id]["type"] not in PRIMITIVE_TYPES:
                inputs[spec.name] = [str(link.origin_id), link.origin_slot]
            elif spec.is_widget and spec.name in values:
                inputs[spec.name] = values[spec.name]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or schema.get("display_name") or kind}}
    return prompt


def comparable(prompt: Mapping[str, Mapping], object_info: Mapping[str, Mapping]) -> dict[str, dict]:
    """A prompt reduced to what must agree between two converters: class types, and each schema
    input's value or link. Inputs that are not in the schema (the front end sends e.g. the display
    widget of PreviewAny as ``preview``) are dropped; numbers compare as floats."""
    reduced = {}
    for node_id, entry in prompt.items():
        kind = entry["class_type"]
        names = {spec.name for spec in input_specs(object_info.get(kind, {}))}
        inputs = {}
        for name, value in entry.get("inputs", {}).items():
            if name not in names:
                continue
            if isinstance(value, list) and len(value) == 2:
                value = [str(value[0]), int(value[1])]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            inputs[name] = value
        reduced[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return reduced


# --------------------------------------------------------------------------------------------------
# checks


def is_model_file(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES)


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def check_workflow(workflow: Mapping, object_info: Mapping[str, Mapping]) -> list[str]:
    """Everything in the workflow that a server with these node types would not accept, as messages:
    unknown node types, widget values that do not fit their inputs (combo values must be listed,
    except model file names, which depend on the machine; numbers within min/max and on the step
    grid; types right), links whose type differs from the output's or the input's, and required
    inputs left empty."""
    problems: list[str] = []
    nodes, links = nodes_of(workflow), links_of(workflow)

    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']}{': ' + node['title'] if node.get('title') else ''})"
        if node["type"] in VIRTUAL_TYPES:
            continue
        schema = object_info.get(node["type"])
        if schema is None:
            problems.append(f"{where}: node type not in /object_info")
            continue
        specs = input_specs(schema)
        try:
            values, controls = widget_values(node, schema)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        slots = {inp["name"]: inp for inp in node.get("inputs") or []}
        for name in slots:
            if name not in {s.name for s in specs}:
                problems.append(f"{where}: input '{name}' is not in the schema")
        for spec in specs:
            slot = slots.get(spec.name)
            linked = slot is not None and slot.get("link") is not None
            if spec.is_widget:
                problems += [f"{where}: {m}" for m in _check_value(spec, values.get(spec.name))]
            elif not linked and not spec.optional:
                problems.append(f"{where}: required input '{spec.name}' is not connected")
            if slot is not None and slot.get("type") and not _types_match(slot["type"], spec.type):
                problems.append(f"{where}: input '{spec.name}' is saved as {slot['type']}, the schema says "
                                f"{spec.type}")
        for name, control in controls.items():
            if control not in CONTROL_VALUES:
                problems.append(f"{where}: control after generate of '{name}' is {control!r}")
        outputs = schema.get("output") or []
        for slot_index, out in enumerate(node.get("outputs") or []):
            if slot_index >= len(outputs):
                problems.append(f"{where}: output slot {slot_index} is not in the schema")
            elif out.get("type") and not _types_match(out["type"], outputs[slot_index]):
                problems.append(f"{where}: output {slot_index} saved as {out['type']}, schema says "
                                f"{outputs[slot_index]}")

    for link in links.values():
        where = f"link {link.id} ({link.origin_id}:{link.origin_slot} -> {link.target_id}:{link.target_slot})"
        origin, target = nodes.get(link.origin_id), nodes.get(link.target_id)
        if origin is None or target is None:
            problems.append(f"{where}: a node it joins does not exist")
            continue
        if origin["type"] not in VIRTUAL_TYPES and origin["type"] in object_info:
            outputs = object_info[origin["type"]].get("output") or []
            if link.origin_slot >= len(outputs):
                problems.append(f"{where}: {origin['type']} has no output {link.origin_slot}")
            elif not _types_match(outputs[link.origin_slot], link.type):
                problems.append(f"{where}: typed {link.type}, but {origin['type']} output {link.origin_slot} "
                                f"is {outputs[link.origin_slot]}")
        out_slots = origin.get("outputs") or []
        if link.origin_slot >= len(out_slots) or link.id not in (out_slots[link.origin_slot].get("links") or []):
            problems.append(f"{where}: not listed in the origin node's output links")
        in_slots = target.get("inputs") or []
        if link.target_slot >= len(in_slots) or in_slots[link.target_slot].get("link") != link.id:
            problems.append(f"{where}: the target node's input slot does not point back to it")
            continue
        if target["type"] in VIRTUAL_TYPES or target["type"] not in object_info:
            continue
        name = in_slots[link.target_slot]["name"]
        spec = next((s for s in input_specs(object_info[target["type"]]) if s.name == name), None)
        if spec is None:
            problems.append(f"{where}: {target['type']} has no input '{name}'")
        elif not _types_match(spec.type, link.type):
            problems.append(f"{where}: typed {link.type}, but {target['type']} input '{name}' takes {spec.type}")
    return problems


def _check_value(spec: InputSpec, value: Any) -> list[str]:
    name, opts = spec.name, spec.options
    if spec.type == "COMBO":
        if is_model_file(value):
            parts = value.replace("\\", "/").split("/")
            return [f"'{name}': {value!r} is not a file name under its model folder"] \
                if value.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] else []
        if value not in (spec.choices or ()):
            return [f"'{name}': {value!r} is not one of {list(spec.choices or ())[:12]}"]
        return []
    if spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"'{name}': {value!r} is not a boolean"]
    if spec.type == "STRING":
        return [] if isinstance(value, str) else [f"'{name}': {value!r} is not a string"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [f"'{name}': {value!r} is not a number"]
    problems = []
    if spec.type == "INT" and not float(value).is_integer():
        problems.append(f"'{name}': {value!r} is not an integer")
    low, high = opts.get("min"), opts.get("max")
    if low is not None and value < low or high is not None and value > high:
        problems.append(f"'{name}': {value!r} is outside [{low}, {high}]")
    step = opts.get("step")
    if spec.type == "INT" and step and (value - (low or 0)) % step:
        problems.append(f"'{name}': {value!r} is not on the step grid ({step} from {low or 0})")
    return problems


# --------------------------------------------------------------------------------------------------
# test settings


def model_files(prompt: Mapping[str, Mapping]) -> set[str]:
    """Every model file name the prompt asks for (combo values that look like files)."""
    return {value for entry in prompt.values() for value in entry["inputs"].values() if is_model_file(value)}


LORA_INPUT = re.compile(r"^lora_name(_\d+)?$")
"""LoRA file inputs: ``lora_name``, and the numbered slots of stacker nodes (``lora_name_1``...)."""


def substitute_models(prompt: Mapping[str, Mapping], *, checkpoint: str, loras: Mapping[str, str],
                      files: Mapping[str, str] | None = None) -> dict:
    """A copy with every checkpoint name replaced by ``checkpoint``, every LoRA name (``lora_name``,
    a stacker's ``lora_name_<n>``) mapped through ``loras`` and other model inputs (``unet_name``,
    ``vae_name``...) set from ``files`` (a name with no test file raises ``KeyError``: the test would
    not know what to run)."""
    prompt = copy.deepcopy(dict(prompt))
    files = dict(files or {})
    for node_id, entry in prompt.items():
        inputs = entry["inputs"]
        for name, value in inputs.items():
            if not is_model_file(value):
                continue
            if name == "ckpt_name":
                inputs[name] = checkpoint
            elif LORA_INPUT.match(name):
                if value not in loras:
                    raise KeyError(f"node {node_id} ({entry['class_type']}): no test LoRA for {value!r}")
                inputs[name] = loras[value]
            elif name in files:
                inputs[name] = files[name]
            else:
                raise KeyError(f"node {node_id} ({entry['class_type']}): no test file for '{name}' = {value!r}")
    return prompt


TEXT_ENCODER_LOADERS = frozenset({"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader"})


def replace_text_encoder_loaders(prompt: Mapping[str, Mapping], class_type: str, inputs: Mapping[str, Any]) -> dict:
    """A copy in which every stock text-encoder loader is the node ``class_type`` with ``inputs``
    (the links to its CLIP output stay: a loader's CLIP is its only output)."""
    prompt = copy.deepcopy(dict(prompt))
    for entry in prompt.values():
        if entry["class_type"] in TEXT_ENCODER_LOADERS:
            entry["class_type"], entry["inputs"] = class_type, dict(inputs)
    return prompt


CPU_MERGE = {"iterations": 1, "samples_per_prompt": 1, "timesteps": 2, "steps": 2, "batch_size": 4}


def shrink_for_cpu(prompt: Mapping[str, Mapping], *, size: int = 64, steps: int = 2,
                   merge: Mapping[str, Any] | None = None) -> dict:
    """A copy with small images and few steps: latents, merge samples and before/after grids of
    ``size`` pixels, ``steps`` sampler steps, and the merge settings in ``CPU_MERGE`` (overridden by
    ``merge``). Only literal values are changed; linked inputs stay linked."""
    prompt = copy.deepcopy(dict(prompt))
    merge_values = {**CPU_MERGE, "width": size, "height": size, **(merge or {})}

    def put(inputs: dict, name: str, value: Any) -> None:
        if name in inputs and not isinstance(inputs[name], list):
            inputs[name] = value

    for entry in prompt.values():
        kind, inputs = entry["class_type"], entry["inputs"]
        if (kind.startswith("Empty") and "Latent" in kind) or kind == "EmptyImage":
            put(inputs, "width", size)
            put(inputs, "height", size)
            put(inputs, "batch_size", 1)
        elif kind in ("KSampler", "KSamplerAdvanced"):
            put(inputs, "steps", steps)
            if kind == "KSamplerAdvanced":
                put(inputs, "end_at_step", steps)
        elif kind == "IterIS_MergeLoras":
            for name, value in merge_values.items():
                put(inputs, name, value)
        elif kind == "IterIS_CompareGrid":
            for name, value in (("width", size), ("height", size), ("steps", steps)):
                put(inputs, name, value)
    return prompt


def output_nodes(prompt: Mapping[str, Mapping], object_info: Mapping[str, Mapping]) -> dict[str, str]:
    """``{node id: class type}`` of the prompt's output nodes."""
    return {node_id: entry["class_type"] for node_id, entry in prompt.items()
            if object_info[entry["class_type"]].get("output_node")}

