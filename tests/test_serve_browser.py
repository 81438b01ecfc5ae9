"""The web page in real headless Chromium (Debian's chromium through Playwright): chat with images, generate images.

Skips when the `playwright` package or a chromium binary is missing. Set OPENJANUS_SCREENSHOTS=DIR to keep
the screenshots.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from PIL import Image  # noqa: E402
from test_serve_support import LiveServer, SlowPipe, png_bytes, tiny_pipe  # noqa: E402

from openjanus.serve import ServeSettings  # noqa: E402
from openjanus.serve.app import create_app  # noqa: E402

CHROMIUM = os.environ.get("OPENJANUS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT = 30_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")

DROP_IMAGE = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
  const zone = document.getElementById("chat-view");
  for (const type of ["dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""

COUNT_UPDATES = """() => {
  window.replyUpdates = 0;
  new MutationObserver(() => { window.replyUpdates += 1; })
    .observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # A short delay per step, so that streaming and the progress indicator can be seen.
    slow = SlowPipe(tiny_pipe(tiny_model_dir), delay=0.03, image_steps=15)
    settings = ServeSettings(model_id="janus-tiny", default_max_tokens=24, max_tokens_limit=64)
    with LiveServer(create_app(slow, settings)) as live:
        yield live


def assert_not_blank(path: Path) -> None:
    image = Image.open(path).convert("RGB")
    low, high = image.convert("L").getextrema()
    colours = image.getcolors(maxcolors=1 << 20)
    assert high - low > 60 and colours is not None and len(colours) > 20, f"{path} looks blank"


def test_chat_and_images_in_chromium(server, tmp_path):
    expect = sync_api.expect
    shots = Path(os.environ.get("OPENJANUS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    picture = tmp_path / "photo.png"
    picture.write_bytes(png_bytes((64, 48)))
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as error:  # a chromium that cannot start here is an environment problem
            pytest.skip(f"chromium did not start: {str(error).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820}, accept_downloads=True)
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            chats = []
            page.on("request", lambda r: chats.append(r) if r.url.endswith("/v1/chat/completions") else None)
            page.goto(f"{server.url}/")
            expect(page.locator("#model")).to_contain_text("janus-tiny")

            # Attach one image with the button and one by drag and drop, then ask.
            with page.expect_file_chooser() as chooser:
                page.click("#attach")
            chooser.value.set_files(str(picture))
            expect(page.locator("#attachments img")).to_have_count(1)
            page.evaluate(DROP_IMAGE, base64.b64encode(png_bytes((30, 30), (20, 20, 200))).decode())
            expect(page.locator("#attachments img")).to_have_count(2)
            page.evaluate(COUNT_UPDATES)
            page.fill("#max-tokens", "12")  # the tiny model's context is 256 tokens: keep room for a second turn
            page.fill("#prompt", "What is in the image?")
            page.click("#send")
            expect(page.locator(".message.assistant.streaming")).to_have_count(1)
            reply = page.locator(".message.assistant.done .text")
            expect(reply).to_have_count(1, timeout=TIMEOUT)
            assert reply.inner_text().strip(), "an answer is shown"
            assert page.evaluate("window.replyUpdates") > 5, "the answer arrived piece by piece"
            sent = chats[0].post_data_json
            assert sent["stream"] is True and sent["max_tokens"] == 12
            parts = sent["messages"][0]["content"]
            assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
            assert all(p["image_url"]["url"].startswith("data:image/") for p in parts[:2])

            # A second turn carries the conversation.
            page.fill("#prompt", "And the colours?")
            page.keyboard.press("Enter")
            expect(page.locator(".message.assistant.done")).to_have_count(2, timeout=TIMEOUT)
            assert [m["role"] for m in chats[-1].post_data_json["messages"]] == ["user", "assistant", "user"]
            page.screenshot(path=str(shots / "chat.png"))
            assert_not_blank(shots / "chat.png")

            # Generate images: progress while waiting, then a gallery with downloads.
            page.click("#tab-images")
            page.fill("#image-prompt", "a red square on grey")
            page.fill("#image-n", "3")
            page.fill("#seed", "7")
            page.evaluate("""() => { const g = document.getElementById("guidance"); g.value = "3";
                                     g.dispatchEvent(new Event("input")); }""")
            expect(page.locator("#guidance-value")).to_have_text("3")
            page.click("#generate")
            expect(page.locator("#progress")).to_be_visible()
            expect(page.locator("#progress-text")).to_contain_text("Generating 3 images")
            expect(page.locator("#gallery figure img")).to_have_count(3, timeout=TIMEOUT)
            expect(page.locator("#progress")).to_be_hidden()
            page.wait_for_function("[...document.querySelectorAll('#gallery img')]"
                                   ".every((img) => img.complete && img.naturalWidth === 32)")
            with page.expect_download() as download:
                page.locator("#gallery a").first.click()
            saved = tmp_path / download.value.suggested_filename
            download.value.save_as(saved)
            assert saved.suffix == ".png" and Image.open(saved).size == (32, 32)
            page.screenshot(path=str(shots / "images.png"))
            assert_not_blank(shots / "images.png")
            assert not problems, problems
        finally:
            browser.close()
