"""Vision-language fine-tuning end to end through the real `together` SDK (2.x) against a live server: a tiny
Idefics3 (SmolVLM's architecture) registered with `tuneforge models add` (its config says it is a vision model),
image-and-text conversations where the answer is the colour of a solid-colour image, a LoRA job whose loss falls
below what a model blind to the image can reach, then chat with image content parts: the fine-tuned model names
every training image's colour, greedy, served at once; streamed too. What cannot work is refused with the reason:
images for a text model (at create and at chat), train_vision for a text model, DPO on a vision model, a remote
image URL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import LiveServer, tuneforge_cli
from ft_support import TINY_LLAMA, Watch, client, create_job, ft_server, metrics, skip_without_training, train_rows
from ft_support import upload_ready as upload
from together import Together
from vision_support import COLOURS, QUESTION, colour_records, data_url, image_message

from tuneforge.train.tiny_models import save_tiny_vlm

pytestmark = pytest.mark.timeout(300)

TINY_VLM = "tiny/vlm"
LORA = {"n_epochs": 20, "batch_size": 3, "learning_rate": 5e-3, "lora_r": 8, "lora_alpha": 16, "n_checkpoints": 1}
BLIND_FLOOR = math.log(3) / 6  # the colour token is 1 of ~4-6 trained tokens an answer


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    skip_without_training()
    root = tmp_path_factory.mktemp("vision")
    with ft_server(root, owners=("alice",), slots=2) as server:
        folder = save_tiny_vlm(root / "models" / "vlm", hidden=128, embedding_scale=4.0)
        out = tuneforge_cli("models", "add", TINY_VLM, "--source", f"local:{folder}", home=server.home,
                            env=server.env)  # fmt: skip
        assert TINY_VLM in out, out
        yield server


@pytest.fixture(scope="module")
def alice(srv: LiveServer) -> Together:
    return client(srv, srv.keys["alice"])


@pytest.fixture(scope="module")
def colours_file(alice: Together, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = Path(tmp_path_factory.mktemp("data") / "colours.jsonl")
    return upload(alice, path, colour_records(6))  # 18 examples: 6 steps an epoch


@pytest.fixture(scope="module")
def tuned(alice: Together, colours_file: str) -> Any:
    job = create_job(alice, colours_file, model=TINY_VLM, **LORA)
    return Watch(alice, job.id).completed(timeout=240)


def _ask(c: Together, model: str, rgb: tuple[int, int, int], **kw: Any) -> Any:
    return c.chat.completions.create(model=model, messages=[image_message(data_url(rgb))], max_tokens=8,
                                     temperature=0, **kw)  # fmt: skip


def test_the_catalog_marks_the_vision_model(srv: LiveServer, alice: Together) -> None:
    listed = tuneforge_cli("models", "list", home=srv.home, env=srv.env)
    [row] = [line for line in listed.splitlines() if line.startswith(TINY_VLM)]
    assert row.split()[-2] == "True", row  # VISION (then DOWNLOADED)
    [model] = [m for m in alice.models.list() if m.id == TINY_VLM]
    assert model.model_extra is not None and model.model_extra.get("supports_vision") is True


def test_lora_on_images_learns_the_colours_and_serves_them(alice: Together, tuned: Any) -> None:
    losses = [row["train/loss"] for row in train_rows(metrics(alice, tuned.id))]
    assert losses[0] > 1.0 and losses[-1] < BLIND_FLOOR / 2, losses
    assert tuned.multimodal_params is not None and tuned.multimodal_params.train_vision is False

    name = tuned.x_model_output_name
    answers = [str(_ask(alice, name, rgb).choices[0].message.content).strip() for rgb in COLOURS.values()]
    assert answers == list(COLOURS)
    base = _ask(alice, TINY_VLM, COLOURS["red"])  # the base model reads images too (it just has not learned)
    assert base.choices[0].finish_reason in ("stop", "length")

    pieces = [chunk.choices[0].delta.content or "" for chunk in _ask(alice, name, COLOURS["blue"], stream=True)
              if chunk.choices]  # fmt: skip
    assert "".join(pieces).strip() == "blue"


def test_what_cannot_work_is_refused_with_the_reason(
    srv: LiveServer, alice: Together, colours_file: str, tuned: Any
) -> None:
    def srv_http(_: Any) -> Any:
        return srv.http(srv.keys["alice"])

    with pytest.raises(together.BadRequestError, match="contains images, but model tiny/llama is not a vision model"):
        create_job(alice, colours_file, model=TINY_LLAMA)
    with pytest.raises(ValueError, match="Vision encoder training is not supported"):  # the SDK reads the limits
        alice.fine_tuning.create(training_file=colours_file, model=TINY_LLAMA, train_vision=True)
    with srv_http(alice) as http:  # a client that sends it anyway
        r = http.post("/v1/fine-tunes", json={"training_file": colours_file, "model": TINY_LLAMA,
                                             "multimodal_params": {"train_vision": True}})  # fmt: skip
        assert r.status_code == 400 and "train_vision is only available for vision models" in r.text, r.text
    with pytest.raises(together.BadRequestError, match="vision-language model; preference tuning"):
        alice.fine_tuning.create(training_file=colours_file, model=TINY_VLM, training_method="dpo")
    with pytest.raises(together.BadRequestError, match="reads text only"):
        _ask(alice, TINY_LLAMA, COLOURS["red"])
    with pytest.raises(together.BadRequestError, match="no remote URLs"):
        alice.chat.completions.create(model=TINY_VLM, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
            {"type": "text", "text": QUESTION}]}])  # fmt: skip


def test_train_vision_is_taken_for_a_vision_model(alice: Together, colours_file: str) -> None:
    job = alice.fine_tuning.create(training_file=colours_file, model=TINY_VLM, train_vision=True, n_epochs=1,
                                   batch_size=6, lora=True)  # fmt: skip
    done = Watch(alice, job.id).completed(timeout=240)
    assert done.multimodal_params is not None and done.multimodal_params.train_vision is True
