"""`llava-smoe chat` as a real process, driven through its prompt on a stdin pipe."""

import os
import subprocess

import pytest
from PIL import Image
from test_serve_api import cli, tiny_checkpoint


@pytest.mark.slow  # a fresh process imports torch and transformers (~20-30 s here)
def test_chat_command_over_a_pipe(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory)
    Image.new("RGB", (40, 30), (220, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (30, 40), (20, 20, 220)).save(tmp_path / "blue.png")
    script = "\n".join([
        "What is in the image?",
        f"/image {tmp_path / 'blue.png'}",
        "And in this one?",
        "/routing",
        "/reset",
        "Hello again",
        "/quit",
        "this line is never read",
    ]) + "\n"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [*cli(), "chat", checkpoint, "--image", str(tmp_path / "red.png"), "--device", "cpu", "--threads", "1",
         "--max-new-tokens", "16", "--temperature", "0"],
        input=script, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("assistant> ") == 3  # one streamed reply per message, none for commands
    assert out.count("you> ") == 7  # the prompt is shown before every line read
    assert "attached to your next message" in out
    assert "tokens per expert (text | image)" in out
    assert "(conversation cleared)" in out
    assert "Traceback" not in result.stderr
    replies = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert all(r.strip() for r in replies)
