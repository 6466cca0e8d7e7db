"""`llava-smoe web` in a real headless Chromium (Playwright, the distribution's browser)."""

import os

import pytest
from PIL import Image
from test_serve_api import free_port, start_process, stop_process, tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)"),
]

# Records every length the last chat message's text takes while the reply streams in.
WATCH_REPLY = """() => {
  window.__replyLengths = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.message.bot, [data-testid="bot"]');
    if (bots.length) window.__replyLengths.push(bots[bots.length - 1].innerText.trim().length);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_page_uploads_image_and_streams_reply(tmp_path_factory, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    checkpoint = tiny_checkpoint(tmp_path_factory)
    port = free_port()
    proc = start_process(["web", checkpoint, "--port", str(port), "--device", "cpu", "--threads", "1",
                          "--max-new-tokens", "48"], port, tmp_path / "web.log", ready_path="/")
    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(image_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#message textarea", timeout=60_000)
            assert "Send a message to see which experts" in page.inner_text("#routing")
            page.set_input_files("#image-input input[type=file]", str(image_path))
            page.wait_for_selector("#image-input img", timeout=30_000)
            page.evaluate(WATCH_REPLY)
            page.fill("#message textarea", "What is in this image?")
            page.click("#send")
            page.wait_for_selector("#routing table", timeout=120_000)  # filled in once the reply is complete
            lengths = page.evaluate("window.__replyLengths")
            chat_text = page.inner_text("#chatbot")
            routing_text = page.inner_text("#routing")
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            browser.close()
    finally:
        stop_process(proc)
    assert "What is in this image?" in chat_text
    assert len({n for n in lengths if n > 0}) >= 2, f"the reply did not stream: {lengths}"
    assert "language_model.model.layers.1.mlp" in routing_text and "image" in routing_text
    assert (tmp_path / "web.png").stat().st_size > 10_000


def test_page_behind_a_login(tmp_path_factory, tmp_path):
    """With --auth (here from the environment), the page's config and API need the login."""
    import httpx

    checkpoint = tiny_checkpoint(tmp_path_factory)
    port = free_port()
    proc = start_process(["web", checkpoint, "--port", str(port), "--device", "cpu", "--threads", "1"], port,
                         tmp_path / "web.log", ready_path="/", env={"LLAVA_SMOE_WEB_AUTH": "ann:s3cret"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + "/config", timeout=30).status_code == 401
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/login", data={"username": "ann", "password": "wrong"}).status_code >= 400
            assert client.get("/config").status_code == 401
            assert client.post("/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        stop_process(proc)
