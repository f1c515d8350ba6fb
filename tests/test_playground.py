"""The chat playground in a real headless browser (Debian's Chromium and its driver): the page
loads with no external assets, a typed message gets a streamed reply with its timings, and on a
server with an API key the page asks for the key and then works."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import KEYS, LORA_KEY
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,700",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_the_page_needs_nothing_from_outside(server: str) -> None:
    page = requests.get(f"{server}/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # offline: no CDN


def chat(browser: webdriver.Chrome, message: str) -> str:
    """Type a message, wait for its streamed reply's timings; that stats line. Seeded, and
    sent again with the next seed while the sampled reply ends at once ("0 tokens", which
    the model may choose and no test here wants)."""

    def stats(b: webdriver.Chrome) -> list[str]:
        return [s.text for s in b.find_elements(By.CSS_SELECTOR, ".assistant .stats") if s.text]

    for seed in range(1, 6):
        field = browser.find_element(By.ID, "seed")
        field.clear()
        field.send_keys(str(seed))
        replied = len(stats(browser))
        browser.find_element(By.ID, "input").send_keys(message, Keys.ENTER)
        WebDriverWait(browser, 60).until(lambda b, n=replied: len(stats(b)) > n)
        if not stats(browser)[-1].startswith("0 tokens"):
            break
    return stats(browser)[-1]


def test_a_message_gets_a_streamed_reply_with_its_timings(
    browser: webdriver.Chrome, server: str, tmp_path: Path
) -> None:
    browser.get(f"{server}/playground")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "model").text == "tailorgpt-testmodel"
    )
    assert not browser.find_element(By.ID, "key-row").is_displayed()  # no key on this server
    stats = chat(browser, "你好，今天写点什么？")
    assert re.fullmatch(r"\d+ tokens · TTFT \d+\.\d\d s · ([\d.]+|–) tokens/s", stats), stats
    reply = browser.find_elements(By.CSS_SELECTOR, ".assistant .text")[-1].text
    assert reply.strip()
    chat(browser, "再说一句")  # the second turn carries the first
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user")) == 2
    assert browser.save_screenshot(str(tmp_path / "playground.png"))  # README's, once made so


def test_on_a_server_with_a_key_the_page_asks_for_it(
    browser: webdriver.Chrome, keyed_server: str
) -> None:
    browser.get(f"{keyed_server}/playground")
    row = browser.find_element(By.ID, "key-row")
    WebDriverWait(browser, 30).until(lambda b: row.is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(KEYS[0], Keys.TAB)  # `change` loads the model
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "model").text == "tailorgpt-testmodel"
    )
    assert "tokens/s" in chat(browser, "Hello")


def test_the_page_lists_the_adapters_and_chats_with_the_one_chosen(
    browser: webdriver.Chrome, lora_server: str
) -> None:
    """On a server of LoRA adapters, the page lists them under the base; a chat with one
    chosen runs it (its request counter moves)."""
    browser.get(f"{lora_server}/playground")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "key-row").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(LORA_KEY, Keys.TAB)
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "adapter-row").is_displayed())
    adapter = Select(browser.find_element(By.ID, "adapter"))
    assert [o.text for o in adapter.options][1:] == ["alice"]  # bob is loaded later, if at all
    adapter.select_by_visible_text("alice")
    key = {"Authorization": f"Bearer {LORA_KEY}"}

    def alice_requests() -> float:
        text = requests.get(f"{lora_server}/metrics", headers=key, timeout=10).text
        line = [x for x in text.splitlines() if x.startswith("tailorgpt_lora_requests_total{")]
        return sum(float(x.rsplit(" ", 1)[1]) for x in line if 'adapter="alice"' in x)

    before = alice_requests()
    assert "tokens" in chat(browser, "Hello")
    assert alice_requests() == before + 1
