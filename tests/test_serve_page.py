"""The chat page at `/` in a real headless Chromium (Selenium with the system's chromedriver): typing a
message streams the greedy reply `generate` gives for the same conversation; system prompt, no_think,
temperature and stop strings reach the server. Skips only when no Chromium is installed."""

import shutil

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from serve_helpers import running, tiny_chat_model

from smoltrain.model.generate import generate
from smoltrain.post.chat.repl import load_chat_model
from smoltrain.post.chat.template import encode_prompt, end_of_turn_id
from smoltrain.serve import build_app

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")

# Counts the reply bubble's updates: more than one means the reply was streamed, not set once.
COUNT_UPDATES = """
window.updates = 0;
new MutationObserver((records) => {
  window.updates += records.filter((r) => r.target.classList && r.target.classList.contains('assistant')).length;
}).observe(document.getElementById('log'), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(driver on the chat page, model, tokenizer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_chat_model(tiny_chat_model(tmp_path_factory.mktemp("page")), device="cpu")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,720"):
        options.add_argument(flag)
    with running(build_app(model, tokenizer, name="tiny", max_tokens=64)) as url:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url)
            yield driver, model, tokenizer
        finally:
            driver.quit()
            torch.set_num_threads(previous)


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _reply(driver, model, tokenizer, messages, max_tokens, stop=None):
    """Send the last user message through the page; (the page's reply, generate's greedy reply)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".assistant.done"))
    driver.execute_script(COUNT_UPDATES)
    _set(driver, "prompt", messages[-1]["content"])
    driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) > before)
    bubble = driver.find_elements(By.CSS_SELECTOR, ".assistant.done")[-1]
    expected = _greedy(model, tokenizer, messages, max_tokens)
    return bubble, expected if stop is None else expected[: expected.index(stop)]


def _greedy(model, tokenizer, messages, max_tokens) -> str:
    prompt = encode_prompt(tokenizer, messages, enable_thinking=False)
    return tokenizer.decode(generate(model, [prompt], max_tokens, stop_tokens=[end_of_turn_id(tokenizer)])[0],
                            skip_special_tokens=False)


def test_the_page_streams_greedy_replies_with_system_prompt_no_think_and_stop(page):
    driver, model, tokenizer = page
    WebDriverWait(driver, 30).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    system = "Answer briefly."
    _set(driver, "system", system)
    _set(driver, "temperature", "0")
    _set(driver, "max-tokens", "24")
    think = driver.find_element(By.ID, "think")
    if think.is_selected():
        think.click()

    first = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 3?"}]
    bubble, expected = _reply(driver, model, tokenizer, first, 24)
    text = bubble.get_property("textContent")
    assert text == expected and "error" not in bubble.get_attribute("class")
    assert driver.execute_script("return window.updates") > 1  # streamed: the bubble grew several times

    second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "And 4 + 4?"}]
    bubble, expected = _reply(driver, model, tokenizer, second, 24)  # the page keeps the conversation
    assert bubble.get_property("textContent") == expected

    # a stop string the page can hold (one per line: no newline) from the middle of a reply
    alone, stop = next(([second[0], {"role": "user", "content": q}], reply[i : i + 3])
                       for q in ("Name a colour.", "Hello there", "Why is the sky blue?", "Count to ten.")
                       for reply in [_greedy(model, tokenizer, [second[0], {"role": "user", "content": q}], 24)]
                       for i in range(3, len(reply) - 3) if "\n" not in reply[i : i + 3] and reply[i : i + 3].strip())
    _set(driver, "stop", stop)
    driver.find_element(By.ID, "reset").click()  # a new conversation: the second question alone, with the stop
    bubble, expected = _reply(driver, model, tokenizer, alone, 24, stop=stop)
    assert bubble.get_property("textContent") == expected and bubble.get_attribute("data-finish") == "stop"
