"""A LoRA concept's prompts from what the file and its sidecar files say, for when none are typed.

Where trigger words and training tags are found, most trusted first:

1. sidecar files beside the LoRA, written by download helpers: ``<stem>.civitai.info`` (Civitai's
   model-version JSON: ``trainedWords``) and ``<stem>.json`` (``trainedWords``, A1111's
   ``activation text``, ``trigger``/``triggers``): the author's own words;
2. ``modelspec.trigger_phrase`` (Stability's model spec);
3. kohya's dataset folders, ``ss_datasets`` ``class_tokens`` and the ``ss_dataset_dirs`` names:
   ``16_smf girl`` is ``<repeats>_<trigger phrase>``, whose last word is the class word when the
   phrase has two or more (``girl``); ai-toolkit writes its folder ``1_YEW`` the same way in
   ``ss_tag_frequency``;
4. kohya's ``ss_tag_frequency``: per folder, how many training captions hold each tag.

Free text (``ss_training_comment``, ``ss_output_name``, Civitai's model name) is not read: it names
the file or talks about the trigger, it is not prompt text.

The prompts are written in ComfyUI's (and A1111's) prompt syntax, where ``(x)`` is emphasis:
parentheses that belong to a tag, as in ``smart falcon (umamusume)``, are escaped as ``\\(`` and
``\\)``, which ComfyUI's tokenizer reads as literal parentheses (``comfy/sd1_clip.py``,
``escape_important``). kohya stores such tags escaped already, because its captions were written
so: the diffusers backend, which hands prompts to the tokenizer as they are, sees what kohya trained
on. The ``tags`` of :class:`DerivedPrompts` hold them plain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

MAX_TAGS = 8               # tags per prompt: with the trigger about 30-45 CLIP tokens
MAX_TRIGGER_PHRASES = 4    # an author's list of trigger words rarely needs more in one prompt
TOKEN_BUDGET = 60          # CLIP reads 75 tokens per chunk; the estimate below runs ~15% low, so keep a margin
CORE_TAGS = 3              # the most frequent tags (the concept's identity) go into every tagged variant
WINDOW_TAGS = 4            # and each later variant adds this many of the next ones, and a scene
_LONG_TAG_WORDS = 12       # a "tag" longer than this is a whole natural-language caption, not a tag
# a tag in fewer captions than this share of the most frequent tag's shows one image, not the concept
MIN_TAG_SHARE = 0.1

# Settings that vary the later prompts, so the samples do not all show the training images' scene.
SCENES = ("outdoors", "indoors", "simple background", "close-up", "full body", "night")

CIVITAI_SUFFIX = ".civitai.info"
JSON_SUFFIX = ".json"
# keys of ``<stem>.json`` sidecars, by the tools that write them
_JSON_KEYS = ("trainedWords", "activation text", "activation_text", "trigger", "triggers", "trigger_words")

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_DUPLICATE_SUFFIX = re.compile(r"\s\(\d+\)$")         # kohya names a second folder of one name "name (2)"
_EXTRA_NETWORK = re.compile(r"<[^<>]*:[^<>]*>")       # A1111's <lora:name:1>, <lyco:...>, <hypernet:...>
_WEIGHTED = re.compile(r"^\((.*?)(?::\s*[-+]?\d*\.?\d+)?\)$", re.S)   # a whole phrase in (x) or (x:1.2)
_NOT_A_WORD = {"", "true", "false", "none", "null", "nan"}
_PREPOSITIONS = {"in", "by", "with", "on", "at", "from", "as", "of"}
_CLIP_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


@dataclass(frozen=True)
class DerivedPrompts:
    """Prompts made from a LoRA's metadata and sidecar files, and what they were made of.

    ``prompts`` are in ComfyUI prompt syntax (a tag's parentheses escaped); ``trigger``,
    ``class_word`` and ``tags`` (the training tags the prompts use, most frequent first) are plain
    text. ``sources`` names, most trusted first, every place that gave something.
    """

    prompts: tuple[str, ...]
    trigger: str | None
    class_word: str | None
    tags: tuple[str, ...]
    sources: tuple[str, ...]

    def describe(self) -> str:
        """One line for people: which words the prompts are made of, and where each came from."""
        parts = []
        if self.trigger:
            parts.append(f"trigger {self.trigger!r}")
        if self.class_word:
            parts.append(f"class word {self.class_word!r}")
        if self.tags:
            more = ", ..." if len(self.tags) > 3 else ""
            parts.append(f"{len(self.tags)} training tags ({', '.join(self.tags[:3])}{more})")
        return f"{len(self.prompts)} prompts derived from {'; '.join(self.sources)}: {', '.join(parts)}"


def missing_prompts_message(lora_name: str) -> str:
    """What to tell a user whose LoRA has no typed prompts and nothing to derive them from."""
    return (f"{lora_name}: no prompts were given, and none can be derived from the file: its metadata has no "
            f"trigger phrase, kohya dataset folder or training tags, and no sidecar file ({CIVITAI_SUFFIX} or "
            f"{JSON_SUFFIX} beside it) names trigger words. Give at least one prompt that shows this LoRA's "
            "concept, with its trigger words: 2-5 varied prompts, e.g. 'a photo of sks dog' and "
            "'sks dog on a beach'")


# --- text in and out of prompt syntax -------------------------------------------------------------

def unescape_parentheses(text: str) -> str:
    r"""``smart falcon \(umamusume\)`` -> ``smart falcon (umamusume)``."""
    return text.replace("\\(", "(").replace("\\)", ")")


def escape_parentheses(text: str) -> str:
    r"""Plain text -> ComfyUI prompt text whose parentheses are literal: ``(`` -> ``\(``."""
    return text.replace("(", "\\(").replace(")", "\\)")


def clean_phrase(text: str) -> str | None:
    """A trigger word or tag as plain text: A1111 extra-network tags dropped, an emphasis wrapper such
    as ``(smf girl:1.2)`` removed (the samples do not apply weights), escapes undone, spaces
    collapsed. None for what is no word at all (empty, a boolean, a number)."""
    text = _EXTRA_NETWORK.sub(" ", text).strip()
    wrapped = _WEIGHTED.match(text)
    if wrapped and "\\" not in text[-2:] and _balanced(wrapped.group(1)):   # "\(x\)" is a literal tag
        text = wrapped.group(1)
    text = " ".join(unescape_parentheses(text).split())
    if text.lower() in _NOT_A_WORD or text.replace(".", "", 1).isdigit():
        return None
    return text


def _balanced(text: str) -> bool:
    """Whether unescaped parentheses pair up: "(a) and (b)" is not one phrase in emphasis."""
    depth = 0
    for char in text.replace("\\(", "").replace("\\)", ""):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def split_phrases(text: str) -> list[str]:
    """Comma- or line-separated trigger words (``"smf girl, hair bow"``) as cleaned phrases."""
    return [p for p in (clean_phrase(part) for part in re.split(r"[,\n]", text)) if p]


def approx_clip_tokens(text: str) -> int:
    """A rough CLIP token count: a word is one token, a long word two, each punctuation mark one."""
    return sum(2 if len(piece) > 8 else 1 for piece in _CLIP_PIECE.findall(text))


def _key(text: str) -> str:
    return text.casefold()


# --- what the file and its sidecars say -------------------------------------------------------------

@dataclass
class _Findings:
    """Trigger phrases, class words and tag counts gathered over the sources, in trust order."""

    triggers: list[str] = field(default_factory=list)
    class_words: list[str] = field(default_factory=list)
    tag_counts: dict[str, int] = field(default_factory=dict)   # casefolded tag -> count
    tag_spelling: dict[str, str] = field(default_factory=dict)  # casefolded tag -> first spelling
    sources: list[str] = field(default_factory=list)

    def add_triggers(self, phrases: list[str], source: str) -> None:
        new = [p for p in phrases if _key(p) not in {_key(t) for t in self.triggers}]
        if new:
            self.triggers.extend(new)
            self.cite(source)

    def add_class_word(self, word: str, source: str) -> None:
        if _key(word) not in {_key(c) for c in self.class_words}:
            self.class_words.append(word)
            self.cite(source)

    def add_tags(self, counts: Mapping[str, int]) -> None:
        for tag, count in counts.items():
            key = _key(tag)
            self.tag_spelling.setdefault(key, tag)
            self.tag_counts[key] = self.tag_counts.get(key, 0) + count

    def cite(self, source: str) -> None:
        if source not in self.sources:
            self.sources.append(source)


def _read_json(path: Path) -> Any:
    """A sidecar's JSON, or None: sidecars come from third-party helpers, and a broken one must not
    stop a merge that the file's own metadata can still serve."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _json_value(text: str | None) -> Any:
    """A metadata value that holds JSON (kohya writes dicts as JSON strings), or None."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _phrases_of(value: Any) -> list[str]:
    """Trigger phrases from a string or a list of strings (Civitai's ``trainedWords``)."""
    if isinstance(value, str):
        return split_phrases(value)
    if isinstance(value, list):
        return [p for item in value if isinstance(item, str) for p in split_phrases(item)]
    return []


def sidecar_paths(lora_path: str | Path) -> tuple[Path, Path]:
    """``<stem>.civitai.info`` and ``<stem>.json`` beside the LoRA file (Civitai Helper, A1111 and the
    download helpers name them by the LoRA's stem)."""
    path = Path(lora_path)
    return path.with_name(path.stem + CIVITAI_SUFFIX), path.with_name(path.stem + JSON_SUFFIX)


def _read_sidecars(lora_path: str | Path, found: _Findings) -> None:
    civitai, helper = sidecar_paths(lora_path)
    data = _read_json(civitai) if civitai.is_file() else None
    if isinstance(data, dict):
        found.add_triggers(_phrases_of(data.get("trainedWords")), f"sidecar {civitai.name} trainedWords")
    data = _read_json(helper) if helper.is_file() else None
    if isinstance(data, dict):
        nested = data.get("civitai")   # LoRA managers keep Civitai's version JSON under "civitai"
        if isinstance(nested, dict) and "trainedWords" not in data:
            data = {**data, "trainedWords": nested.get("trainedWords")}
        for key in _JSON_KEYS:
            found.add_triggers(_phrases_of(data.get(key)), f"sidecar {helper.name} {key}")


def folder_trigger(folder: str) -> tuple[str, str | None] | None:
    """``"16_smf girl"`` -> ``("smf girl", "girl")``: kohya's ``<repeats>_<trigger> <class>`` folder name
    without its repeat count; the class word is the last word of a phrase of two or more. None for a
    folder not named so (a dataset config's plain image folder says nothing about the concept)."""
    match = _REPEATS_FOLDER.match(_DUPLICATE_SUFFIX.sub("", folder.strip()))
    phrase = clean_phrase(match.group(2)) if match else None
    return (phrase, class_word_of(phrase)) if phrase else None


def class_word_of(phrase: str) -> str | None:
    words = phrase.split()
    return words[-1] if len(words) >= 2 else None


def _read_kohya_datasets(metadata: Mapping[str, str], found: _Findings) -> None:
    """``ss_datasets`` (kohya with a dataset config): each DreamBooth subset's ``class_tokens``."""
    datasets = _json_value(metadata.get("ss_datasets"))
    for dataset in datasets if isinstance(datasets, list) else []:
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        for subset in subsets if isinstance(subsets, list) else []:
            if not isinstance(subset, dict) or subset.get("is_reg"):
                continue   # regularisation images show the class, not the concept
            tokens = subset.get("class_tokens")
            phrase = clean_phrase(tokens) if isinstance(tokens, str) else None
            if phrase:
                source = f"ss_datasets class_tokens '{tokens}'"
                found.add_triggers([phrase], source)
                if (word := class_word_of(phrase)) is not None:
                    found.add_class_word(word, source)


def _read_folders(folders: Any, key: str, found: _Findings) -> None:
    for folder in folders if isinstance(folders, dict) else {}:
        parsed = folder_trigger(str(folder))
        if parsed:
            phrase, word = parsed
            source = f"{key} folder '{folder}'"
            found.add_triggers([phrase], source)
            if word is not None:
                found.add_class_word(word, source)


def _tag_counts(per_folder: Any) -> Iterator[tuple[str, dict[str, int]]]:
    """``ss_tag_frequency``'s folders with their tags as plain text and integer counts."""
    for folder, tags in (per_folder.items() if isinstance(per_folder, dict) else ()):
        if not isinstance(tags, dict):
            continue
        counts: dict[str, int] = {}
        for tag, count in tags.items():
            plain = clean_phrase(str(tag))
            if plain and isinstance(count, (int, float)) and not isinstance(count, bool) and count > 0:
                counts[plain] = counts.get(plain, 0) + int(count)
        yield str(folder), counts


def _read_metadata(metadata: Mapping[str, str], found: _Findings) -> None:
    found.add_triggers(_phrases_of(metadata.get("modelspec.trigger_phrase")), "modelspec.trigger_phrase")
    _read_kohya_datasets(metadata, found)
    dirs = _json_value(metadata.get("ss_dataset_dirs"))
    _read_folders(dirs, "ss_dataset_dirs", found)
    frequency = _json_value(metadata.get("ss_tag_frequency"))
    _read_folders(frequency, "ss_tag_frequency", found)
    images = 0
    for folder, counts in _tag_counts(frequency):
        found.add_tags(counts)
        # a tag counts once per caption, so the most frequent tag is a lower bound on the images;
        # ss_dataset_dirs knows the folder's exact count
        known = dirs.get(folder) if isinstance(dirs, dict) else None
        count = known.get("img_count") if isinstance(known, dict) else None
        images += count if isinstance(count, int) and count > 0 else max(counts.values(), default=0)
    if found.tag_counts:
        found.cite(f"ss_tag_frequency ({images} image{'' if images == 1 else 's'})")


# --- the prompts --------------------------------------------------------------------------------------

def _ranked_tags(found: _Findings, skip: set[str]) -> list[str]:
    """Usable tags, most frequent first; ties keep the captions' order (the trainer's order)."""
    counts = found.tag_counts
    order = {key: i for i, key in enumerate(counts)}
    floor = MIN_TAG_SHARE * max(counts.values(), default=0)
    keys = sorted(counts, key=lambda k: (-counts[k], order[k]))
    return [found.tag_spelling[k] for k in keys
            if k not in skip and counts[k] >= floor and len(found.tag_spelling[k].split()) <= _LONG_TAG_WORDS]


def _join(parts: list[str]) -> str:
    """Comma-joined prompt parts, dropping trailing ones past the token budget (the first always stays)."""
    kept: list[str] = []
    for part in dict.fromkeys(parts):       # a scene may also be a training tag
        if kept and approx_clip_tokens(", ".join(kept + [part])) > TOKEN_BUDGET:
            break
        kept.append(part)
    return ", ".join(kept)


def _variants(head: list[str], subject: str, tags: list[str]) -> Iterator[str]:
    """Prompts in a fixed order: the caption-like one, a plain one, then tag windows in varied scenes."""
    yield _join(head + tags[:MAX_TAGS])
    # "a photo in the xyz style", "a photo of sks dog"
    yield f"a photo {subject}" if subject.split()[0].lower() in _PREPOSITIONS else f"a photo of {subject}"
    core, rest = tags[:CORE_TAGS], tags[CORE_TAGS:]
    start = MAX_TAGS - CORE_TAGS            # past the tags the first prompt already shows
    for i, scene in enumerate(SCENES):
        # windows go round the less frequent tags, so few tags still give distinct prompts
        chosen = [rest[(start + i * WINDOW_TAGS + j) % len(rest)] for j in range(min(WINDOW_TAGS, len(rest)))]
        yield _join(head + core + list(dict.fromkeys(chosen)) + [scene])


def derive_prompts(metadata: Mapping[str, str], *, lora_path: str | Path | None = None,
                   count: int = 4) -> DerivedPrompts | None:
    """Up to ``count`` varied prompts for a LoRA from its trigger words, class word and most frequent
    training tags, found in ``metadata`` (the safetensors header's) and, when ``lora_path`` is given,
    in the sidecar files beside it. The same input always gives the same prompts. None when nothing
    usable is found: no trigger words and no training tags.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    found = _Findings()
    if lora_path is not None:
        _read_sidecars(lora_path, found)
    _read_metadata(metadata, found)

    # a later phrase already inside an earlier one ("smf" after "smf girl") adds nothing
    triggers: list[str] = []
    for phrase in found.triggers:
        if not any(re.search(rf"(?<!\w){re.escape(_key(phrase))}(?!\w)", _key(t)) for t in triggers):
            triggers.append(phrase)
    triggers = triggers[:MAX_TRIGGER_PHRASES]
    class_word = found.class_words[0] if found.class_words else None
    tags = _ranked_tags(found, {_key(t) for t in found.triggers} | {_key(c) for c in found.class_words})
    if not triggers and not tags:
        return None

    trigger = triggers[0] if triggers else None
    head = triggers if triggers else tags[:1]
    tags = tags if triggers else tags[1:]
    subject = head[0]
    if class_word and len(subject.split()) == 1:   # "smf" + "girl"; "sks dog" names its class already
        subject = f"{subject} {class_word}"
    prompts: list[str] = []
    for variant in _variants([escape_parentheses(p) for p in head], escape_parentheses(subject),
                             [escape_parentheses(t) for t in tags]):
        if variant not in prompts:
            prompts.append(variant)
        if len(prompts) == count:
            break
    used = tuple(t for t in tags if any(escape_parentheses(t) in p.split(", ") for p in prompts))
    return DerivedPrompts(tuple(prompts), trigger, class_word, used, tuple(found.sources))
