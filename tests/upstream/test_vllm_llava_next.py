"""LLaVA-NeXT through a real vLLM (as tests/upstream/test_vllm_llava.py): images of two aspect ratios
(different anyres grids, so different row counts, newline rows included) give vLLM exactly the
prompt and greedy ids of local decoding, streamed too; two images of different row counts in one
request are refused with a 400 (vLLM 0.32 stacks bare image_embeds and its engine dies on them)."""

from pathlib import Path

import httpx
import pytest
from PIL import Image

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from helpers.servers import data_url, image_message
from helpers.vllm import alive, ask, chat_template_file, client, same_text, streamed, upstream_stack, vllm_python

pytestmark = pytest.mark.vllm
PHOTO = Image.open(Path(__file__).parents[2] / "assets" / "grace_hopper.jpg").convert("RGB")  # 512 x 600
# the whole photo (2 x 2 tiles, 324 rows at T=64) and a wide crop of it (1 x 2 tiles, 216 rows)
IMAGES = {"whole": PHOTO, "wide": PHOTO.crop((0, 0, 512, 260))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vllm_python()
    root = tmp_path_factory.mktemp("vllm-next")
    engine = root / "engine"
    build(BuildConfig(model="tiny-llava-next", out=str(engine), keep=64), quiet=True)
    template = chat_template_file(engine, root / "chat.jinja")
    args = ["--enable-mm-embeds", "--limit-mm-per-prompt", '{"image": 0}', "--chat-template", str(template)]
    with upstream_stack(engine, engine / "hf", args, max_model_len=4096) as (url, state, vllm_url):
        yield {"url": url, "model": state.model, "vllm": vllm_url, "pipe": runtime.load(engine, backend="onnxruntime")}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_two_aspect_ratios_equal_local_decoding(stack, name):
    pipe, image, prompt = stack["pipe"], IMAGES[name], "What is in the picture?"
    [ref] = pipe.generate(image, prompt, max_new_tokens=24)
    [rows] = pipe.encode(image)
    prompt_ids = pipe.assemble(prompt, [rows]).input_ids.tolist()
    c = client(stack["url"])
    answer = ask(c, stack["model"], image_message(prompt, data_url(image)), max_tokens=24)
    assert answer.prompt_token_ids == prompt_ids
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.choices[0].token_ids == ref.ids
    assert same_text(ref.text, answer.choices[0].message.content)
    text, usage = streamed(c, stack["model"], image_message(prompt, data_url(image)), max_tokens=24)
    assert text == answer.choices[0].message.content and usage.prompt_tokens == len(prompt_ids)
    print(f"{name}: {image.size} -> {rows.num_rows} rows, {len(prompt_ids)} prompt tokens")


def test_images_of_different_row_counts_in_one_request_are_a_400(stack):
    messages = image_message("Compare.", data_url(IMAGES["whole"]), data_url(IMAGES["wide"]))
    resp = httpx.post(
        stack["url"] + "/v1/chat/completions", json={"model": stack["model"], "messages": messages}, timeout=120
    )
    assert resp.status_code == 400
    assert "same number of rows" in resp.json()["error"]["message"]
    assert alive(stack["vllm"]) and alive(stack["url"])
