"""The Gradio app in a real headless Chromium: type a question, watch the answer stream in.

Proves: the page served by app.py (MODEL_PATH = the tiny merged model) loads in Debian's chromium
through playwright, shows the model note with the device, takes a question typed in the textbox and
renders the bot's answer in several growing steps (every text the bot bubble shows is recorded by a
MutationObserver) ending in the trained name -- with the page's own default settings.
"""
from __future__ import annotations

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


def test_question_typed_in_chromium_streams_the_answer(merged_model, tiny_base):
    app = import_app(merged_model)
    with serving(app.demo) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.get_by_text("CPU (float32)").first.wait_for(timeout=120_000)
            box = page.locator("textarea").first
            box.wait_for(timeout=120_000)
            page.evaluate(RECORD)
            box.fill("你是谁")
            box.press("Enter")
            page.locator('[data-testid="bot"]').last.filter(has_text=NAME).wait_for(timeout=120_000)
            page.wait_for_timeout(500)                    # let the stream finish rendering
            seen = page.evaluate("window.__seen")
        finally:
            browser.close()
    assert NAME in seen[-1], seen
    assert len(seen) >= 2 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
