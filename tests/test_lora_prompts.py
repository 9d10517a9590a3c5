"""Prompts from the LoRA itself: trigger words, class word and training tags read from each kind of
metadata (kohya, modelspec, ai-toolkit) and sidecar file (Civitai, A1111), written as ComfyUI reads
them; typed prompts win; a file with nothing to go on gets a message asking for prompts. Real
published files (where ../shared is present) give their own trigger words."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from iteris_core import Concept, MergeSettings, SamplingSettings, SettingsError, merge_loras
from iteris_core.backends.tiny import random_lora_deltas
from iteris_core.cli import main
from iteris_core.lora_io import atomic_write_safetensors, read_lora_file
from iteris_core.lora_normalize import NormalizedLora
from iteris_core.lora_prompts import (MAX_TAGS, DerivedPrompts, approx_clip_tokens, clean_phrase, derive_prompts,
                                      escape_parentheses, folder_trigger, missing_prompts_message,
                                      unescape_parentheses)
from iteris_core.lora_writer import MergedLora

# kohya's metadata as sd-scripts writes it (values are JSON strings; a tag's parentheses escaped)
KOHYA = {
    "ss_dataset_dirs": json.dumps({"16_smf girl": {"n_repeats": 16, "img_count": 43},
                                   "4_smf girl": {"n_repeats": 4, "img_count": 45}}),
    "ss_tag_frequency": json.dumps({
        "16_smf girl": {"smart falcon \\(umamusume\\)": 43, "hair bow": 43, "1girl": 40, "smile": 36, "blush": 33,
                        "open mouth": 26, "white shirt": 21, "pink skirt": 19, "wrist cuffs": 21, "dress": 18,
                        "back bow": 16, "music": 1},
        "4_smf girl": {"smart falcon \\(umamusume\\)": 45, "hair bow": 45, "looking at viewer": 39, "smile": 32}}),
    "ss_output_name": "smart_falcon_16_lokr",
    "ss_training_comment": "trigger word is smart falcon \\(umamusume\\)",
    "ss_network_module": "lycoris.kohya",
}
AI_TOOLKIT = {"ss_tag_frequency": json.dumps({"1_YEW": {"YEW": 1}}), "ss_base_model_version": "sd_1.5",
              "ss_output_name": "flux_train_replicate", "name": "flux_train_replicate",
              "software": json.dumps({"name": "ai-toolkit"})}
CIVITAI_INFO = {"id": 1234, "name": "v1.0", "trainedWords": ["sks dog, red collar", "sks puppy"],
                "baseModel": "SD 1.5", "model": {"name": "Good Dog", "type": "LORA"}}

# (id, header metadata, sidecar files beside dog.safetensors, trigger, class word, a source that must be named)
KINDS = [
    ("kohya", KOHYA, {}, "smf girl", "girl", "ss_dataset_dirs folder '16_smf girl'"),
    ("kohya-config", {"ss_datasets": json.dumps([{"is_dreambooth": True, "subsets": [
        {"image_dir": "images", "class_tokens": "zqx woman", "is_reg": False},
        {"image_dir": "reg", "class_tokens": "woman", "is_reg": True}]}]),
        "ss_dataset_dirs": json.dumps({"images": {"n_repeats": 2, "img_count": 10}})},
     {}, "zqx woman", "woman", "ss_datasets class_tokens 'zqx woman'"),
    ("modelspec", {"modelspec.trigger_phrase": "in the xyz style", "modelspec.architecture": "stable-diffusion-v1"},
     {}, "in the xyz style", None, "modelspec.trigger_phrase"),
    ("ai-toolkit", AI_TOOLKIT, {}, "YEW", None, "ss_tag_frequency folder '1_YEW'"),
    ("civitai-sidecar", {"modelspec.trigger_phrase": "something else"}, {"dog.civitai.info": CIVITAI_INFO},
     "sks dog", None, "sidecar dog.civitai.info trainedWords"),
    ("a1111-sidecar", {}, {"dog.json": {"description": "", "sd version": "SD1", "preferred weight": 0.8,
                                        "activation text": "<lora:dog:0.8> (sks dog:1.2), red collar"}},
     "sks dog", None, "sidecar dog.json activation text"),
    ("helper-sidecar", {}, {"dog.json": {"triggers": ["qwv cat", "qwv kitten"]}}, "qwv cat", None,
     "sidecar dog.json triggers"),
]


def _write_sidecars(folder: Path, sidecars: dict) -> Path:
    for name, content in sidecars.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder / "dog.safetensors"


def _unescaped_parentheses(prompt: str) -> list[str]:
    return re.findall(r"(?<!\\)[()]", prompt)


@pytest.mark.parametrize("metadata, sidecars, trigger, class_word, source", [k[1:] for k in KINDS],
                         ids=[k[0] for k in KINDS])
def test_each_metadata_kind_gives_its_trigger(tmp_path, metadata, sidecars, trigger, class_word, source):
    derived = derive_prompts(metadata, lora_path=_write_sidecars(tmp_path, sidecars))
    assert isinstance(derived, DerivedPrompts)
    assert (derived.trigger, derived.class_word) == (trigger, class_word)
    assert source in derived.sources
    assert len(derived.prompts) == 4 and len(set(derived.prompts)) == 4
    assert all(trigger in p for p in derived.prompts)
    assert derived.describe().startswith("4 prompts derived from ") and source in derived.describe()


def test_kohya_prompts_are_trigger_class_and_most_frequent_tags():
    derived = derive_prompts(KOHYA)
    assert derived.prompts[0] == ("smf girl, smart falcon \\(umamusume\\), hair bow, smile, 1girl, "
                                  "looking at viewer, blush, open mouth, white shirt")
    assert "a photo of smf girl" in derived.prompts
    assert derived.prompts[2].endswith(", outdoors") and derived.prompts[3].endswith(", indoors")
    # tags plain and most frequent first (counts summed over folders); the rare one unused
    assert derived.tags[:3] == ("smart falcon (umamusume)", "hair bow", "smile")
    assert "music" not in derived.tags              # in 1 of 88 captions: one image, not the concept
    assert derived.sources == ("ss_dataset_dirs folder '16_smf girl'", "ss_tag_frequency (88 images)")
    for prompt in derived.prompts:
        assert len(prompt.split(", ")) <= MAX_TAGS + 1 and approx_clip_tokens(prompt) <= 70
        assert not _unescaped_parentheses(prompt)
        assert "smart_falcon" not in prompt and "trigger word" not in prompt   # free text is not prompt text
    assert derive_prompts(KOHYA) == derived                                    # no randomness


def test_tags_skip_the_trigger_non_words_and_case_duplicates():
    frequency = {"5_zqx cat": {"zqx cat": 5, "ZQX CAT": 1, "True": 5, "": 5, "none": 3, "12": 4, "cat": 5,
                               "sitting": 4, "Sitting": 2, "on a sofa": 3}}
    derived = derive_prompts({"ss_tag_frequency": json.dumps(frequency)})
    assert (derived.trigger, derived.class_word) == ("zqx cat", "cat")
    assert derived.tags == ("sitting", "on a sofa")
    assert derived.prompts[0] == "zqx cat, sitting, on a sofa"
    assert derived.sources == ("ss_tag_frequency folder '5_zqx cat'", "ss_tag_frequency (5 images)")


def test_a_one_word_trigger_takes_the_class_word_and_style_phrases_read_well():
    one_word = derive_prompts({"modelspec.trigger_phrase": "smf",
                               "ss_dataset_dirs": json.dumps({"10_smf girl": {"n_repeats": 10, "img_count": 5}})})
    assert (one_word.trigger, one_word.class_word) == ("smf", "girl")
    assert one_word.prompts[:2] == ("smf, smf girl", "a photo of smf girl")
    style = derive_prompts({"modelspec.trigger_phrase": "in the xyz style, watercolor"})
    assert style.prompts[:2] == ("in the xyz style, watercolor", "a photo in the xyz style")


def test_count_and_determinism():
    assert len(derive_prompts(AI_TOOLKIT, count=1).prompts) == 1
    six = derive_prompts(KOHYA, count=6).prompts
    assert len(set(six)) == 6 and six[:4] == derive_prompts(KOHYA).prompts
    with pytest.raises(ValueError, match="count"):
        derive_prompts(KOHYA, count=0)


@pytest.mark.parametrize("metadata", [
    {},
    {"format": "pt"},
    {"ss_output_name": "dog_lora", "ss_training_comment": "trigger word is sks dog", "name": "dog"},
    {"ss_tag_frequency": "not json", "ss_dataset_dirs": "{"},
    {"ss_dataset_dirs": json.dumps({"images": {"n_repeats": 1, "img_count": 3}})},  # no <repeats>_ name
    {"ss_tag_frequency": json.dumps({"images": {"true": 3, "": 2}})},
], ids=["empty", "peft", "free-text-only", "broken-json", "plain-folder", "non-words"])
def test_nothing_usable_gives_none(metadata):
    assert derive_prompts(metadata) is None


def test_sidecars_win_in_order_and_broken_ones_are_skipped(tmp_path):
    lora = _write_sidecars(tmp_path, {"dog.civitai.info": CIVITAI_INFO, "dog.json": {"trigger": "zzz"}})
    derived = derive_prompts(KOHYA, lora_path=lora)
    assert derived.trigger == "sks dog"
    assert derived.prompts[0].startswith("sks dog, red collar, sks puppy, zzz, smart falcon")
    assert derived.sources[:3] == ("sidecar dog.civitai.info trainedWords", "sidecar dog.json trigger",
                                   "ss_dataset_dirs folder '16_smf girl'")
    assert derived.class_word == "girl" and "a photo of sks dog" in derived.prompts

    other = tmp_path / "other"
    other.mkdir()
    (other / "dog.civitai.info").write_text("{not json")
    (other / "dog.json").write_bytes(b"\xff\xfe\x00")
    assert derive_prompts(AI_TOOLKIT, lora_path=other / "dog.safetensors").trigger == "YEW"


@pytest.mark.parametrize("text, plain", [
    ("smart falcon \\(umamusume\\)", "smart falcon (umamusume)"),
    ("(sks dog:1.2)", "sks dog"),
    ("(sks dog)", "sks dog"),
    ("(smart falcon \\(umamusume\\):0.9)", "smart falcon (umamusume)"),
    ("\\(literal\\)", "(literal)"),
    ("(a) and (b)", "(a) and (b)"),
    ("<lora:dog:1>  sks   dog", "sks dog"),
    ("False", None),
    ("0.5", None),
])
def test_clean_phrase(text, plain):
    assert clean_phrase(text) == plain


def test_parentheses_are_escaped_as_comfyui_reads_them_literally(comfy_nodes):
    """The prompt goes through ComfyUI's own parsing (``SDTokenizer.tokenize_with_weights``):
    every piece keeps weight 1.0 and the tag's parentheses come back as literal text."""
    import comfy.sd1_clip as sd1_clip

    prompt = derive_prompts(KOHYA).prompts[0]
    assert "smart falcon \\(umamusume\\)" in prompt
    pieces = sd1_clip.token_weights(sd1_clip.escape_important(prompt), 1.0)
    assert {weight for _, weight in pieces} == {1.0}
    text = "".join(sd1_clip.unescape_important(piece) for piece, _ in pieces)
    assert "smart falcon (umamusume)" in text and "\\" not in text
    # unescaped, ComfyUI would weigh the tag's "(umamusume)" as emphasis
    plain = sd1_clip.token_weights(sd1_clip.escape_important(unescape_parentheses(prompt)), 1.0)
    assert any(weight != 1.0 for _, weight in plain)
    assert escape_parentheses("a (b) c") == "a \\(b\\) c" and unescape_parentheses("a \\(b\\) c") == "a (b) c"


def test_folder_names():
    assert folder_trigger("16_smf girl") == ("smf girl", "girl")
    assert folder_trigger("1_YEW") == ("YEW", None)
    assert folder_trigger("8_smf girl (2)") == ("smf girl", "girl")
    assert folder_trigger("10_a photo of zqx dog") == ("a photo of zqx dog", "dog")
    assert folder_trigger("images") is None and folder_trigger("5_") is None


def test_message_asks_for_prompts_and_names_the_file():
    message = missing_prompts_message("bare.safetensors")
    assert message.startswith("bare.safetensors: ")
    assert "at least one prompt" in message and "trigger words" in message and "2-5" in message


# --- real published files -----------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [4, 8, 16])
def test_real_kohya_lokr_files_give_smf_girl(samples_dir, rank):
    path = samples_dir / f"sd15_kohya_lokr_r{rank}_fp16.safetensors"
    derived = derive_prompts(read_lora_file(path, with_hash=False).metadata, lora_path=path)
    assert (derived.trigger, derived.class_word) == ("smf girl", "girl")
    # the captions never say "smf girl"; their tag in every image is the character's own name
    assert derived.tags[0] == "smart falcon (umamusume)"
    assert derived.prompts[0].startswith("smf girl, smart falcon \\(umamusume\\), hair bow, ")
    assert derived.sources == ("ss_dataset_dirs folder '16_smf girl'", "ss_tag_frequency (130 images)")
    assert all(approx_clip_tokens(p) <= 70 and not _unescaped_parentheses(p) for p in derived.prompts)


def test_real_ai_toolkit_file_gives_yew(samples_dir):
    path = samples_dir / "flux1_peft_aitoolkit_r16_fp16.safetensors"
    derived = derive_prompts(read_lora_file(path, with_hash=False).metadata, lora_path=path)
    assert derived.trigger == "YEW" and derived.tags == ()
    assert derived.prompts == ("YEW", "a photo of YEW", "YEW, outdoors", "YEW, indoors")
    assert not any("flux_train_replicate" in p for p in derived.prompts)


def test_real_file_without_metadata_gives_none(samples_dir):
    path = samples_dir / "sd15_diffusers_lora_r4.safetensors"
    assert derive_prompts(read_lora_file(path, with_hash=False).metadata, lora_path=path) is None


# --- through the API and the CLI ------------------------------------------------------------------------

FAST = SamplingSettings(samples_per_prompt=1, timesteps=1, steps=2, batch_size=4, seed=1)


def _write_lora(backend, path: Path, metadata: dict | None, seed: int) -> Path:
    table = backend.layer_table()
    tensors = MergedLora(random_lora_deltas(table, seed, rank=2, scale=0.2), table).state_dict()
    return atomic_write_safetensors(tensors, path, metadata, overwrite=True)


@pytest.fixture()
def encoded(tiny_backend, monkeypatch) -> list[str]:
    """Every prompt the merge encodes (the backend's own encoder does the work)."""
    seen: list[str] = []
    original = tiny_backend.encode_text

    def encode_text(prompts):
        seen.extend(prompts)
        return original(prompts)

    monkeypatch.setattr(tiny_backend, "encode_text", encode_text)
    return seen


def test_merge_derives_missing_prompts_and_typed_prompts_win(tiny_backend, tmp_path, encoded):
    sidecar = _write_lora(tiny_backend, tmp_path / "dog.safetensors", None, 1)
    (tmp_path / "dog.civitai.info").write_text(json.dumps(CIVITAI_INFO))
    typed = _write_lora(tiny_backend, tmp_path / "smf.safetensors", KOHYA, 2)
    concept_a, concept_b = Concept(str(sidecar), ["", "  "]), Concept(typed, ["a photo of qqq"])
    result = merge_loras(tiny_backend, [concept_a, concept_b], MergeSettings(method="regmean", sampling=FAST))

    derived = derive_prompts({}, lora_path=sidecar)
    first, second = result.report.inputs
    assert first.prompt_source == derived.describe() and first.prompts == 4
    assert "sidecar dog.civitai.info trainedWords" in first.prompt_source
    assert (second.prompt_source, second.prompts) == ("typed", 1)
    assert set(derived.prompts) | {"a photo of qqq"} <= set(encoded)
    assert not any("smf girl" in p for p in encoded)          # the typed concept's metadata is not used
    assert concept_a.prompts == ["", "  "] and concept_a.lora == str(sidecar)   # the caller's concept unchanged
    summary = result.report.summary()
    assert "dog.safetensors: strength 1 (text 1)" in summary and derived.describe() in summary
    assert "smf.safetensors" in summary and "1 typed prompt\n" in summary


def test_no_metadata_and_no_prompts_asks_for_prompts(tiny_backend, tmp_path):
    bare = _write_lora(tiny_backend, tmp_path / "bare.safetensors", None, 3)
    with pytest.raises(SettingsError, match=r"^bare\.safetensors: no prompts were given.*at least one prompt"):
        merge_loras(tiny_backend, [Concept(bare)], MergeSettings(sampling=FAST))
    normalized = NormalizedLora("plain lora", random_lora_deltas(tiny_backend.layer_table(), 4, rank=2))
    with pytest.raises(SettingsError, match=r"^plain lora: no prompts were given"):
        merge_loras(tiny_backend, [Concept(normalized)], MergeSettings(sampling=FAST))


def test_normalized_lora_metadata_gives_prompts(tiny_backend, encoded):
    lora = NormalizedLora("yew", random_lora_deltas(tiny_backend.layer_table(), 5, rank=2), metadata=AI_TOOLKIT)
    result = merge_loras(tiny_backend, [Concept(lora)], MergeSettings(method="regmean", sampling=FAST))
    assert "ss_tag_frequency folder '1_YEW'" in result.report.inputs[0].prompt_source
    assert {"YEW", "a photo of YEW"} <= set(encoded)


def test_methods_that_do_not_sample_derive_nothing(tiny_backend, tmp_path):
    bare = _write_lora(tiny_backend, tmp_path / "bare.safetensors", None, 6)
    result = merge_loras(tiny_backend, [Concept(bare), Concept(bare)], MergeSettings(method="linear"))
    assert [i.prompt_source for i in result.report.inputs] == ["none", "none"]
    assert "prompt" not in result.report.summary()


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory, tiny_pipe, tiny_backend) -> Path:
    root = tmp_path_factory.mktemp("cli-prompts")
    tiny_pipe.save_pretrained(str(root / "base"))
    _write_lora(tiny_backend, root / "smf.safetensors", KOHYA, 7)
    _write_lora(tiny_backend, root / "bare.safetensors", None, 8)
    return root


CLI_FAST = ["--method", "regmean", "--samples", "1", "--steps", "2", "--timesteps", "1", "--device", "cpu"]


def test_cli_lora_without_prompts_uses_its_metadata(cli_workspace, capsys):
    ws = cli_workspace
    out, report = ws / "merged.safetensors", ws / "report.json"
    code = main(["merge", "--base", str(ws / "base"), "--lora", str(ws / "smf.safetensors"), "--out", str(out),
                 "--report", str(report), *CLI_FAST])
    assert code == 0 and out.is_file()
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    derived = derive_prompts(KOHYA)
    assert f"smf.safetensors: no prompts given; {derived.describe()}: {' | '.join(derived.prompts)}" in captured.err
    entry = json.loads(report.read_text())["inputs"][0]
    assert entry["prompts"] == 4 and entry["prompt_source"] == derived.describe()


def test_cli_lora_with_nothing_to_go_on_says_what_to_do(cli_workspace, capsys):
    ws = cli_workspace
    code = main(["merge", "--base", str(ws / "base"), "--lora", str(ws / "smf.safetensors"),
                 "--lora", str(ws / "bare.safetensors"), "--out", str(ws / "never.safetensors"), *CLI_FAST])
    assert code == 2 and not (ws / "never.safetensors").exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: bare.safetensors: no prompts were given") and "at least one prompt" in line


def test_cli_inspect_shows_the_prompts_it_would_derive(cli_workspace, capsys):
    assert main(["inspect", str(cli_workspace / "smf.safetensors")]) == 0
    text = capsys.readouterr().out
    assert derive_prompts(KOHYA).describe() in text and "    a photo of smf girl" in text
    assert main(["inspect", str(cli_workspace / "bare.safetensors")]) == 0
    assert "none can be derived" in capsys.readouterr().out
