"""Qwen2.5-VL through a real vLLM with the operator's opt-in to grid positions
(--upstream-grid-positions): each image part carries a 1-D image_grid_thw whose t*h*w/merge^2 equals
the rows sent, and vLLM answers 200 with exactly the local prompt ids. (Without the opt-in the server
refuses to start: tests/runtime/serve/test_upstream_routes.py.) The positions vLLM then gives the
rows are those of that compact grid, not the kept rows' own: approximate, so only the prompt is
compared here, not the generated ids."""

from pathlib import Path

import pytest
from PIL import Image

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from helpers.servers import data_url, image_message
from helpers.vllm import ask, chat_template_file, client, upstream_stack, vllm_python

pytestmark = pytest.mark.vllm
PHOTO = Image.open(Path(__file__).parents[2] / "assets" / "grace_hopper.jpg").convert("RGB")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vllm_python()
    root = tmp_path_factory.mktemp("vllm-qwen")
    engine = root / "engine"
    build(BuildConfig(model="tiny-qwen2.5-vl", out=str(engine), keep=16), quiet=True)
    template = chat_template_file(engine, root / "chat.jinja")
    args = ["--enable-mm-embeds", "--limit-mm-per-prompt", '{"image": 0}', "--chat-template", str(template)]
    serve = {"upstream_grid_positions": True}
    with upstream_stack(engine, engine / "hf", args, serve=serve) as (url, state, vllm_url):
        yield {"url": url, "model": state.model, "pipe": runtime.load(engine, backend="onnxruntime")}


def test_grid_positions_opt_in_answers_200_with_the_local_prompt(stack):
    pipe, c = stack["pipe"], client(stack["url"])
    for image in (PHOTO, PHOTO.resize((200, 120))):
        [rows] = pipe.encode(image)
        grid = pipe.family.handoff_fields(rows)["image_grid_thw"]
        assert grid.dim() == 1 and int(grid.prod()) // pipe.family.merge**2 == rows.num_rows == 16
        answer = ask(c, stack["model"], image_message("What is in the picture?", data_url(image)), max_tokens=8)
        assert answer.prompt_token_ids == pipe.assemble("What is in the picture?", [rows]).input_ids.tolist()
        assert len(answer.choices[0].token_ids) == 8
