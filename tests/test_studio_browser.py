"""crn-studio end to end in headless Chromium (Debian's chromium + chromium-driver, through Selenium with an
explicit driver path: no browser or driver download).

A tiny model (16x32 native, shown at 16x) is exported once; the page is driven with real pointer events
and the layout it sends is compared, pixel for pixel, with what was drawn and with what the server decoded.
"""

import base64
import io
import json
import pathlib
import urllib.request
from collections import deque

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from crn_tf import labels
from crn_tf.config import get_preset
from crn_tf.model import build_model
from crn_tf.studio.server import BackgroundServer, create_app
from export.saved_model import export_saved_model

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
    "apt-get install -y chromium chromium-driver",
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACE = labels.get_label_space("cityscapes")
H, W = 16, 32  # the tiny preset's native size
CAR, SKY, VOID = 13, 10, labels.VOID_ID
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    tf.keras.utils.set_random_seed(5)
    base = tmp_path_factory.mktemp("studio_browser") / "crn"
    export_saved_model(build_model(get_preset("tiny", num_outputs=1)), str(base))
    return base


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_download(*args, **kwargs):
        raise AssertionError("Selenium Manager must not run: the driver path is given explicitly")

    original = selenium_manager.SeleniumManager.binary_paths
    selenium_manager.SeleniumManager.binary_paths = no_download
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    options.add_argument("--force-device-scale-factor=1")
    try:
        browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    finally:
        selenium_manager.SeleniumManager.binary_paths = original
    browser.set_script_timeout(TIMEOUT_S)
    yield browser
    browser.quit()


def open_page(driver, url):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, TIMEOUT_S).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def canvas_ids(driver) -> np.ndarray:
    """The page's layout canvas, read back as a PNG and decoded to label ids (exact palette colours or void)."""
    url = driver.execute_script("return document.getElementById('layout').toDataURL('image/png')")
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))
    assert (rgba[..., 3] == 255).all()
    colours = {tuple(c) for c in rgba[..., :3].reshape(-1, 3)}
    assert colours <= set(SPACE.palette) | {labels.VOID_COLOR}, f"colours outside the palette: {colours}"
    return labels.colors_to_ids(rgba[..., :3], SPACE)


def flood(ids: np.ndarray, y: int, x: int, new: int) -> np.ndarray:
    """4-connected flood fill (the page's Fill tool, as the test expects it)."""
    out, target, queue = ids.copy(), ids[y, x], deque([(y, x)])
    while queue:
        y, x = queue.popleft()
        if 0 <= y < out.shape[0] and 0 <= x < out.shape[1] and out[y, x] == target:
            out[y, x] = new
            queue.extend([(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)])
    return out


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def test_paint_fill_undo_synthesize(driver, export_base, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(str(export_base), debug_routes=True)
    with BackgroundServer(app) as url:
        open_page(driver, url)
        canvas = driver.find_element(By.ID, "layout")
        assert (canvas.size["width"], canvas.size["height"]) == (16 * W, 16 * H)  # integer zoom, 16 CSS px a pixel
        np.testing.assert_array_equal(canvas_ids(driver), np.full((H, W), VOID))

        def at(x, y):
            """Offset of layout pixel (x, y)'s centre from the canvas centre (Selenium's origin), CSS px."""
            return int((x + 0.5) * 16 - 8 * W), int((y + 0.5) * 16 - 8 * H)

        def stroke(*points):
            chain = ActionChains(driver).move_to_element_with_offset(canvas, *at(*points[0])).click_and_hold()
            for p in points[1:]:
                chain.move_to_element_with_offset(canvas, *at(*p))
            chain.release().perform()

        driver.find_element(By.CSS_SELECTOR, f'#palette button[data-class-id="{CAR}"]').click()
        driver.execute_script(
            "const s = document.getElementById('brush-size'); s.value = 3; s.dispatchEvent(new Event('input'))"
        )
        stroke((3, 8), (16, 8), (28, 8))  # 3x3 brush: rows 7..9, columns 2..29
        stroke((20, 1), (20, 14))  # columns 19..21, rows 0..15: splits the canvas
        painted = np.full((H, W), VOID, np.uint8)
        painted[7:10, 2:30] = CAR
        painted[:, 19:22] = CAR
        np.testing.assert_array_equal(canvas_ids(driver), painted)

        driver.find_element(By.ID, "tool-fill").click()
        driver.find_element(By.CSS_SELECTOR, f'#palette button[data-class-id="{SKY}"]').click()
        ActionChains(driver).move_to_element_with_offset(canvas, *at(0, 0)).click().perform()
        filled = flood(painted, 0, 0, SKY)  # the void left of the vertical stroke only
        assert (filled == SKY).sum() == (painted[:, :19] == VOID).sum()
        np.testing.assert_array_equal(canvas_ids(driver), filled)
        driver.find_element(By.ID, "undo").click()
        np.testing.assert_array_equal(canvas_ids(driver), painted)
        ActionChains(driver).move_to_element_with_offset(canvas, *at(0, 0)).click().perform()
        np.testing.assert_array_equal(canvas_ids(driver), filled)

        driver.find_element(By.ID, "synthesize").click()
        WebDriverWait(driver, TIMEOUT_S).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('photo-0'); return i && i.complete && i.naturalWidth > 0"
            )
        )
        photo_size = driver.execute_script(
            "const i = document.getElementById('photo-0'); return [i.naturalWidth, i.naturalHeight]"
        )
        assert photo_size == [W, H]
        assert "Synthesized the photo" in driver.find_element(By.ID, "status").text

        # What the server decoded (the export's own PNG decoder) is what was drawn.
        last = get_json(f"{url}/studio/debug/last_request")
        assert last["signature_name"] == "synthesize_png" and last["layouts"][0]["shape"] == [H, W]
        sent = np.frombuffer(base64.b64decode(last["layouts"][0]["label_ids_b64"]), np.uint8).reshape(H, W)
        np.testing.assert_array_equal(sent, filled)

        # The photo shown is the model's photo of that layout.
        src = driver.find_element(By.ID, "photo-0").get_attribute("src")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        loaded = tf.saved_model.load(str(export_base / "1"))
        expected = loaded.signatures["serving_default"](label_ids=tf.constant(filled[None]))["image"].numpy()[0]
        np.testing.assert_array_equal(shown, expected)

        screenshot = tmp_path / "crn_studio_after_synthesis.png"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")


def test_sample_layout_and_server_errors_in_words(driver, export_base):
    """A bundled sample loads exactly (nearest-neighbour to the native size); a request the server refuses
    shows its reason on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(str(export_base), max_pixels=H * W - 1)  # every layout is one pixel too many
    with BackgroundServer(app) as url:
        open_page(driver, url)
        config = get_json(f"{url}/studio/config")
        driver.find_element(By.ID, "load-sample").click()  # the first sample
        WebDriverWait(driver, TIMEOUT_S).until(lambda d: "Loaded" in d.find_element(By.ID, "status").text)
        sample = labels.read_label_image(str(ROOT / "examples/layouts" / f"{config['samples'][0]['name']}.png"), SPACE)
        rows = ((np.arange(H) + 0.5) * sample.shape[0] / H).astype(int)
        cols = ((np.arange(W) + 0.5) * sample.shape[1] / W).astype(int)
        np.testing.assert_array_equal(canvas_ids(driver), sample[rows][:, cols])

        driver.find_element(By.ID, "synthesize").click()
        status = driver.find_element(By.ID, "status")
        WebDriverWait(driver, TIMEOUT_S).until(lambda d: "error" in status.get_attribute("class"))
        assert status.text.startswith("The layout is too large for this server:") and "--max_pixels" in status.text
        assert driver.find_element(By.ID, "synthesize").is_enabled()
