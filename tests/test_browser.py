"""The Gradio app in a real headless Chromium: type a question, watch the answer stream in.

Proves: the page served by app.py (MODEL_PATH = the tiny merged model) loads in Debian's chromium
through playwright, shows the model note with the device, takes a question typed in the textbox and
renders the bot's answer in several growing steps (every text the bot bubble shows is recorded by a
MutationObserver) ending in the trained name -- with the page's own default settings.
For a multimodal model (the tiny LLaVA of tests/conftest.py, merged export) the 📎 box takes an image
through its <input type=file>: the thumbnail shows, the sent image shows in the chat, and the colour
question gets the engine's own greedy answer for that image ("It is red."); a second image of another
colour, attached later in the same conversation, gets that colour's answer (the page's history, with the
first image in it, reaches app.py intact).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

from test_app import NAME, import_app, serving

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]

# Records each distinct text of the last bot message as the DOM changes.
RECORD = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : "";
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


@contextmanager
def app_page(app):
    """app.py's page served and open in headless Chromium, once it shows the model note."""
    with serving(app.demo) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.get_by_text("CPU (float32)").first.wait_for(timeout=120_000)
            yield page
        finally:
            browser.close()


def test_question_typed_in_chromium_streams_the_answer(merged_model, tiny_base):
    with app_page(import_app(merged_model)) as page:
        box = page.locator("textarea").first
        box.wait_for(timeout=120_000)
        page.evaluate(RECORD)
        box.fill("你是谁")
        box.press("Enter")
        page.locator('[data-testid="bot"]').last.filter(has_text=NAME).wait_for(timeout=120_000)
        page.wait_for_timeout(500)                    # let the stream finish rendering
        seen = page.evaluate("window.__seen")
    assert NAME in seen[-1], seen
    assert len(seen) >= 2 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen


def ask_about_image(page, image, question: str, n: int) -> str:
    """Attach `image` with the 📎 box, send `question`, wait for the n-th bot reply to finish; its text."""
    box = page.locator(".multimodal-textbox textarea")      # its placeholder goes once a file is attached
    page.get_by_test_id("file-upload").set_input_files(str(image))       # the hidden <input type=file>
    page.locator(".multimodal-textbox .thumbnail-image").wait_for(timeout=30_000)   # uploaded, shown in the box
    box.fill(question)
    box.press("Enter")
    page.locator('[data-testid="bot"]').nth(n - 1).wait_for(timeout=60_000)
    # the submit button hides while the answer streams (it hid before the first bot text) and comes back after
    page.get_by_test_id("submit-button").wait_for(timeout=60_000)
    return page.locator('[data-testid="bot"]').nth(n - 1).inner_text().strip()


def test_image_upload_in_the_browser(mm_merged, mm_colour_images):
    from inference.image_chat import load_llava
    mm_app = import_app(mm_merged)                                # MODEL_PATH = the merged LLaVA export
    own = load_llava(mm_merged, None, device="cpu").engine()      # the chat CLI's loader, apart from the app
    first, second = mm_colour_images["red"], mm_colour_images["green"]
    question = "what colour is the shape?"
    with app_page(mm_app) as page:
        temperature = page.get_by_label("number input for Temperature")
        temperature.fill("0")                                 # greedy, so the reply is exactly the engine's
        temperature.press("Enter")
        # the rest as the page sends it: the system prompt box and the max-new-tokens slider
        settings = dict(system_prompt=page.get_by_label("System prompt").input_value(),
                        max_new_tokens=int(page.get_by_label("number input for Max new tokens").input_value()))
        reply1 = ask_about_image(page, first, question, 1)
        reply2 = ask_about_image(page, second, question, 2)
        shown = page.locator('[data-testid="user"] img').evaluate_all("imgs => imgs.map(i => i.src)")
    expected1 = own.with_image(first).chat([{"role": "user", "content": question}], **settings)
    assert reply1 == expected1 == "It is red.", (reply1, expected1)
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": expected1},
               {"role": "user", "content": question}]
    expected2 = own.with_image(second).chat(history, **settings)  # the chat is about the newest image
    assert reply2 == expected2 == "It is green.", (reply2, expected2)
    assert [Path(s).name for s in shown] == [first.name, second.name], shown     # both images in the chat
