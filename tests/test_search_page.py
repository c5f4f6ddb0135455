"""The search page of ``xmodal serve --ui`` in headless Chromium, against a real service started the way the
README says, over the collection ``xmodal demo`` writes: text, image, composed and "more like this" queries,
filters, the API key, escaping, links, export, and both a desktop and a phone width. Screenshots go to
``--screenshots DIR`` (default: a temporary folder). Every wait is bounded."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from browser_helpers import chromium, missing, phone_width

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "browser available")

from serve_helpers import AUTH, KEY, Server  # noqa: E402

WAIT = 60  # seconds any one step may take (they take well under one)
RED_CIRCLE = "a large red circle in the top left"
SCRIPT = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
PICTURE_URL = "http://127.0.0.1:9/picture.png"  # a payload may name its picture by URL (nothing listens there)
DRAWN = "Array.from(document.querySelectorAll('#results img')).filter(i => i.src.startsWith('blob:'))"


def attributes_id(kind, colour, size, position):
    from xmodal.demo.shapes import Attributes

    return Attributes(kind, colour, size, position).index  # the demo collection's id of that picture


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """What ``xmodal demo`` writes (the model and the collection with its media), with its default training."""
    out = tmp_path_factory.mktemp("demo") / "xmodal-demo"
    subprocess.run([sys.executable, "-m", "xmodal", "demo", "--out", str(out), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, timeout=1200)
    return out


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    s = Server(demo / "collections", "--model", str(demo / "model"), "--ui", "--api-key-file", str(key_file))
    try:
        s.wait_ready(AUTH)
        import httpx  # one item whose payload is markup, next to picture 0 (same vector)

        vector = httpx.get(f"{s.url}/collections/shapes/vectors/0", headers=AUTH).json()["vector"]
        r = httpx.post(f"{s.url}/collections/shapes/vectors", headers=AUTH,
                       json={"ids": [5000], "vectors": [vector],
                             "payloads": [{"caption": SCRIPT, "colour": "red", "image": PICTURE_URL}]})
        assert r.status_code == 200, r.text
        r = httpx.put(f"{s.url}/collections/tiny-8d", headers=AUTH, json={"dim": 8})  # not the model's dimension
        assert r.status_code == 201, r.text
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory):
    folder = request.config.getoption("--screenshots") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = str(tmp_path_factory.mktemp("downloads"))
    driver = chromium(downloads=downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def run(driver, script, *args):
    return driver.execute_script(script, *args)


def status(driver):
    return run(driver, "return document.getElementById('status').textContent")


def wait(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, message=f"waiting for {what}")


def searches(driver):
    return run(driver, "return window.xmodal ? window.xmodal.timings.length : 0")


def results(driver, act):
    """Do ``act()`` (something that starts a search) and return the ids of the cards once the grid is drawn."""
    from selenium.webdriver.common.by import By

    before = searches(driver)
    act()
    wait(driver, lambda d: searches(d) > before or "error" in d.find_element(By.ID, "status").get_attribute("class"),
         "a search to finish")
    assert searches(driver) > before, status(driver)
    return [int(e.get_attribute("data-id")) for e in driver.find_elements(By.CSS_SELECTOR, "#results .card")]


def open_page(driver, url, key=KEY):
    """Load the page with no key stored; given a ``key``, enter it and wait for the collections."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui/")
    run(driver, "sessionStorage.clear()")
    driver.get(url + "/ui/")
    if key is not None:
        wait(driver, lambda d: d.find_element(By.ID, "key-form").is_displayed(), "the key form")
        driver.find_element(By.ID, "key").send_keys(key + "\n")
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#collection option")) > 0, "the collections")


def type_query(driver, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text + Keys.ENTER)


def choose_image(driver, path):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "image").send_keys(str(path))


def test_without_the_key_the_page_says_so_and_asks_once(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url, key=None)
    wait(browser, lambda d: "API key" in status(d), "the 401 message")
    assert browser.find_element(By.ID, "key-form").is_displayed()
    run(browser, "document.getElementById('status').textContent = ''")  # so the next 401 is a new one
    browser.find_element(By.ID, "key").send_keys("a-wrong-key-0123456789\n")
    wait(browser, lambda d: "API key" in status(d), "the 401 message again")
    browser.find_element(By.ID, "key").clear()
    browser.find_element(By.ID, "key").send_keys(KEY + "\n")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#collection option")) > 0, "the collections")
    browser.refresh()  # kept for the tab: not asked again
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#collection option")) > 0, "the collections")
    assert not browser.find_element(By.ID, "key-form").is_displayed()


def test_a_text_query_finds_the_right_picture(server, browser, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    ids = results(browser, lambda: type_query(browser, RED_CIRCLE))
    assert ids[0] == attributes_id("circle", "red", "large", "top left") and len(ids) == 12
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert "colour\nred" in first.text and "kind\ncircle" in first.text and "score" in first.text
    wait(browser, lambda d: run(d, f"return {DRAWN}.every(i => i.complete && i.naturalWidth === 32)"),
         "the thumbnails")
    timing = run(browser, "return window.xmodal.timings.at(-1)")
    assert 0 < timing["grid"] <= timing["thumbnails"]
    browser.save_screenshot(os.path.join(shots, "search-page-1280.png"))


def test_an_uploaded_image_and_a_composed_query(server, browser, demo):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    red_circle = attributes_id("circle", "red", "large", "top left")
    picture = demo / "collections" / "shapes" / "media" / f"{red_circle:03d}.png"
    browser.find_element(By.ID, "text").clear()
    ids = results(browser, lambda: (choose_image(browser, picture), browser.find_element(By.ID, "search").click()))
    assert ids[0] == red_circle
    assert browser.find_element(By.ID, "preview").is_displayed()
    ids = results(browser, lambda: type_query(browser, "make it blue"))  # image + text: composed
    assert ids[0] == attributes_id("circle", "blue", "large", "top left")
    assert "without the uploaded image" in browser.find_element(By.ID, "share").text
    browser.find_element(By.ID, "clear-image").click()
    assert not browser.find_element(By.ID, "preview").is_displayed()
    # dropped on the image box instead of chosen: the same search
    data = list(picture.read_bytes())
    browser.find_element(By.ID, "text").clear()
    run(browser, """const files = new DataTransfer();
        files.items.add(new File([new Uint8Array(arguments[0])], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: files}));""", data)
    assert browser.find_element(By.ID, "drop-text").text == "dropped.png"
    assert results(browser, lambda: browser.find_element(By.ID, "search").click())[0] == red_circle


def test_more_like_this_filters_and_a_link_that_repeats_the_search(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, server.url)
    Select(browser.find_element(By.CSS_SELECTOR, "#filters select[data-key=colour]")).select_by_visible_text("blue")
    ids = results(browser, lambda: type_query(browser, "a small square in the bottom right"))
    assert ids[0] == attributes_id("square", "blue", "small", "bottom right")
    assert all("colour\nblue" in card.text for card in browser.find_elements(By.CSS_SELECTOR, "#results .card"))
    link = browser.find_element(By.ID, "share").get_attribute("href")
    second = ids[1]
    ids = results(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#results .card .more")[1].click())
    assert ids[0] == second and f"more like #{second}" in browser.find_element(By.ID, "like").text
    assert "like=" in browser.current_url
    like_link = browser.current_url
    # the links, opened afresh, answer the same
    for url, want in ((link, None), (like_link, ids)):
        browser.get("about:blank")
        got = results(browser, lambda: browser.get(url))
        if want is not None:
            assert got == want
        else:
            assert got[0] == attributes_id("square", "blue", "small", "bottom right")
            assert Select(browser.find_element(By.CSS_SELECTOR, "#filters select[data-key=colour]")
                          ).first_selected_option.text == "blue"


def test_payload_markup_is_shown_as_text(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    browser.get(f"{server.url}/ui/#collection=shapes&k=5&like=0")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card[data-id='5000']")) == 1,
         "the item with markup")
    card = browser.find_element(By.CSS_SELECTOR, "#results .card[data-id='5000']")
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == SCRIPT
    assert card.find_element(By.CSS_SELECTOR, "img").get_attribute("src") == PICTURE_URL
    assert run(browser, "return window.pwned") is None
    assert run(browser, "return document.querySelectorAll('#results script, #results img[src=x]').length") == 0


def test_errors_in_words_and_json_export(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("20000")
    type_query(browser, RED_CIRCLE)
    wait(browser, lambda d: "k must be in [1, 10000]" in status(d), "the 422 in words")
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("3")
    ids = results(browser, lambda: type_query(browser, RED_CIRCLE))
    browser.find_element(By.ID, "export").click()
    path = os.path.join(browser.downloads, "xmodal-results.json")
    wait(browser, lambda d: os.path.exists(path) and os.path.getsize(path) > 0, "the exported file")
    exported = json.load(open(path))
    assert exported["query"]["text"] == RED_CIRCLE and [h["id"] for h in exported["results"]] == ids
    # a collection of another dimension than the model's
    browser.get(f"{server.url}/ui/#collection=tiny-8d&k=3&text=a%20red%20circle")
    wait(browser, lambda d: "the model embeds into" in status(d) and "holds 8" in status(d), "the dimension error")
    # the words for what a running service rarely shows on cue
    assert "try again in a moment (search queue full)." in run(browser, "return inWords(503, {detail: 'search queue full'})")
    assert run(browser, "return inWords(502, null)") == "The service answered HTTP 502."
    # a typed filter is a number or true / false where the key holds those
    assert run(browser, "return [typedValue('3', 'number'), typedValue('3', 'string'), typedValue('x', 'number'),"
                        " typedValue('true', 'boolean string')]") == [3, "3", "x", True]
    # a media path with dot segments is not fetched (the browser would resolve it into another API path)
    alt = run(browser, "const img = new Image(); return show(img, 'shapes', 'a/../../vectors/1').then(() => img.alt)")
    assert "not inside the media folder" in alt


def test_without_a_model_text_is_off_and_more_like_this_works(demo, tmp_path, browser):
    from selenium.webdriver.common.by import By

    shutil.copytree(demo / "collections", tmp_path / "collections")
    s = Server(tmp_path / "collections", "--ui")
    try:
        s.wait_ready()
        browser.get(s.url + "/ui/")
        wait(browser, lambda d: "need a model" in status(d), "the no-model message")
        assert not browser.find_element(By.ID, "text").is_enabled()
        ids = results(browser, lambda: browser.get(f"{s.url}/ui/#collection=shapes&k=4&like=7"))
        assert ids[0] == 7 and len(ids) == 4
    finally:
        s.stop()


def test_the_page_fits_a_phone(server, browser, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    phone_width(browser)
    try:
        results(browser, lambda: type_query(browser, RED_CIRCLE))
        wait(browser, lambda d: run(d, f"return {DRAWN}.every(i => i.complete && i.naturalWidth > 0)"),
             "the thumbnails")
        assert run(browser, "return document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        assert cards[0].rect["width"] < 195 and cards[0].rect["y"] == cards[1].rect["y"]  # two columns
        browser.save_screenshot(os.path.join(shots, "search-page-390.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
