"""The pack in a real ComfyUI server started by the test: /object_info, a full prompt through
POST /prompt (checkpoint -> concepts -> merge -> KSampler -> VAEDecode -> SaveImage, and the save
node), the same prompt again served from cache, and a bad prompt refused with HTTP 400."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfy_fixtures import COMFYUI_HOME, comfy_base_directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        command = [sys.executable, str(COMFYUI_HOME / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
                   str(self.port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
                   "--disable-api-nodes"]
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.get("/object_info/IterIS_MergeLoras")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        assert status == 200, body
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    base = comfy_base_directory(tmp_path_factory.mktemp("server"), tiny_checkpoint, "tiny_sd15.safetensors",
                                {"dog.safetensors": 1, "style.safetensors": 2})
    running = Server(base)
    yield running
    running.stop()


def full_prompt(save_name: str = "from_http") -> dict:
    merge = {"method": "iteris", "iterations": 1, "regularization": 1e-4, "samples_per_prompt": 1, "timesteps": 2,
             "steps": 3, "cfg": 5.0, "seed": 0, "rank": 0, "width": 64, "height": 64, "batch_size": 2,
             "merge_text_encoder": True, "max_tokens": 0, "statistics_budget": 0.0, "sampler": "default", "scheduler": "default", "guidance": 0.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "IterIS_LoraConcept", "inputs": {"lora_name": "dog.safetensors", "strength_model": 1.0,
                                                            "strength_clip": 1.0, "prompts": "a photo of sks dog"}},
        "3": {"class_type": "IterIS_LoraConcept", "inputs": {"lora_name": "style.safetensors", "strength_model": 1.0,
                                                            "strength_clip": 1.0, "prompts": "a painting, xyz style",
                                                            "previous": ["2", 0]}},
        "4": {"class_type": "IterIS_MergeLoras", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 0],
                                                           **merge}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks dog in xyz style", "clip": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                  "latent_image": ["7", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "iteris_test"}},
        "11": {"class_type": "IterIS_SaveLora", "inputs": {"lora": ["4", 2], "filename": save_name,
                                                          "overwrite": False, "precision": "fp16"}},
    }


def test_object_info_lists_every_node_with_its_inputs(server):
    info = server.get("/object_info")
    merge = info["IterIS_MergeLoras"]
    assert merge["category"] == "loaders/IterIS"
    assert {"model", "clip", "concepts", "method", "iterations", "regularization", "seed", "rank"} <= set(
        merge["input"]["required"])
    assert merge["output"] == ["MODEL", "CLIP", "LORA_MODEL", "STRING"]
    assert "previous" in info["IterIS_LoraConcept"]["input"]["optional"]
    assert info["IterIS_SaveLora"]["output_node"] is True
    assert "(IMPORT FAILED)" not in server.log.read_text().split("Import times for custom nodes")[-1].split("\n\n")[0]


def test_full_prompt_makes_an_image_and_a_lora_then_is_cached(server):
    prompt = full_prompt()
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["10"]["images"]
    assert (server.base / "output" / images[0]["filename"]).is_file()
    assert (server.base / "models" / "loras" / "from_http.safetensors").is_file()
    assert "iteris merge of 2 LoRAs" in entry["outputs"]["4"]["text"][0]
    assert "dog.safetensors" in server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "from_http.safetensors" in listed

    again = server.run(prompt)
    cached = [data for kind, data in again["status"]["messages"] if kind == "execution_cached"]
    assert again["status"]["status_str"] == "success"
    assert set(cached[0]["nodes"]) == set(prompt)
    assert not (server.base / "models" / "loras" / "from_http_00001.safetensors").exists()


def test_bad_name_is_refused_with_http_400_and_no_file(server):
    """A prompt whose only output is a save under '../..' is refused outright; in a prompt with other
    outputs ComfyUI runs the valid ones and reports the refused node in node_errors."""
    prompt = {k: v for k, v in full_prompt(save_name="../../escape").items() if k in {"1", "2", "3", "4", "11"}}
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "x"})
    assert status == 400
    assert "may not contain folders" in json.dumps(body["node_errors"]["11"])
    status, body = server.post("/prompt", {"prompt": full_prompt(save_name="../../escape"), "client_id": "x"})
    assert status == 200 and "may not contain folders" in json.dumps(body["node_errors"]["11"])
    time.sleep(1)
    assert not list(server.base.rglob("escape*"))
