"""The Gradio demo in a real browser (headless Chromium through Selenium), served from a folder laid out as
`publish.py --space true` leaves it, in a process where mae_hf cannot be imported; plus its error paths in-process.

Needs the `demo` extra (gradio, selenium) and Debian's chromium + chromium-driver; .ci/run installs all of them.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae_hf import MAEForImageClassification, MAEForPreTraining
from mae_hf.publish import add_space

NO_DEMO_EXTRA = "the demo extra is not installed: pip install -e '.[demo]'"
pytest.importorskip("gradio", reason=NO_DEMO_EXTRA)
webdriver = pytest.importorskip("selenium.webdriver", reason=NO_DEMO_EXTRA)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
LABELS = {0: "cat", 1: "dog", 2: "ship"}
WAIT_SECONDS = 30  # every wait on the page or the server is bounded

# The app runs as a Space would: mae_hf hidden, so the models come from the folder's own code files.
LAUNCH = r'''
import runpy, sys
class RefuseMaeHf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mae_hf":
            raise ImportError(f"{name} is hidden from this process")
sys.meta_path.insert(0, RefuseMaeHf())
app = sys.argv[1]
sys.argv = [app] + sys.argv[2:]
runpy.run_path(app, run_name="__main__")
'''


def published_folder(path: Path, tiny_config) -> Path:
    """A folder like publish.py's: encoder + decoder + a linear-probe head in one checkpoint, and the Space files."""
    pretrained = MAEForPreTraining(tiny_config())
    probe = MAEForImageClassification(tiny_config(num_labels=3, id2label=LABELS, linear_probe=True))
    probe.save_pretrained(path, state_dict={**pretrained.state_dict(), **probe.state_dict()})
    add_space(str(ROOT / "demo"), str(path))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def served_app(tmp_path, tiny_config):
    """URL of the app serving a published-style folder, started from that folder's app.py on a free port."""
    folder = published_folder(tmp_path / "hub", tiny_config)
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MAE_MODEL")}
    environment.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, str(folder / "app.py"), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=tmp_path, env=environment, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def serving():
        assert process.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(serving, "the app to serve", timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


def rendered_pictures(driver) -> int:
    """How many of the four result images show a loaded picture."""
    return driver.execute_script(
        "return [0, 1, 2, 3].filter(i => { const img = document.querySelector(`#picture-${i} img`);"
        " return img && img.complete && img.naturalWidth > 0; }).length;")


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"const e = document.getElementById('{element_id}'); return e ? e.innerText : '';")


def test_demo_in_a_browser(served_app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    started = time.monotonic()
    # A real photo (a CIFAR-10 example) in another size and mode than the model's: 45x30, grayscale JPEG.
    upload = tmp_path / "upload.jpg"
    Image.open(ROOT / "demo" / "examples" / "cat.png").resize((45, 30)).convert("L").save(upload)
    browser.get(served_app)
    assert "linear probe head over 3 classes" in wait_for(lambda: text_of(browser, "model-info"), "the model line")

    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(upload))
    wait_for(lambda: rendered_pictures(browser) == 4 and "Masked-patch loss" in text_of(browser, "loss"),
             "four pictures and the loss")
    first_loss = text_of(browser, "loss")
    top5 = text_of(browser, "top5-0")
    assert all(label in top5 for label in LABELS.values()) and "%" in top5, top5

    # The slider, by keyboard: 0.75 -> 0.5 hides fewer patches, so another masked-patch loss.
    slider = browser.find_element(By.CSS_SELECTOR, "#mask-ratio input[type=range]")
    slider.send_keys(*[Keys.ARROW_LEFT] * 5)
    browser.find_element(By.CSS_SELECTOR, "#mask-ratio").click()
    wait_for(lambda: text_of(browser, "loss") not in ("", first_loss), "the loss of the new mask ratio")
    assert browser.find_element(By.CSS_SELECTOR, "#mask-ratio input[type=number]").get_attribute("value") == "0.5"
    # The new pictures replace the old ones a moment after the loss: wait for all four to have loaded again.
    wait_for(lambda: rendered_pictures(browser) == 4 and "Done in" in text_of(browser, "status"),
             "four pictures of the new mask ratio")
    browser.save_screenshot(str(tmp_path / "demo.png"))  # the test's artifact: what the page showed
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'demo.png'}; browser part {time.monotonic() - started:.1f} s")


def load_app():
    spec = importlib.util.spec_from_file_location("mae_demo_app", ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_function(page):
    """The one function every control of the page triggers: (path, mask_ratio, seed) -> the outputs."""
    functions = {block.fn for block in page.fns.values() if block.fn.__name__ == "predict"}
    assert len(functions) == 1
    return functions.pop()


def test_demo_errors_are_shown_in_the_page(tmp_path, tiny_config):
    app = load_app()
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit_mae"}')
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"")
    torn = published_folder(tmp_path / "torn", tiny_config)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:1000])
    for folder, message in ((tmp_path, "is not an MAE model folder: it needs config.json"),
                            (tmp_path / "vit", "model_type 'vit_mae', expected 'mae_hf'"),
                            (torn, "model.safetensors is not a whole safetensors file")):
        page = app.build(str(folder))  # a page, not an exception
        outputs = page_function(page)(str(ROOT / "demo" / "examples" / "cat.png"), 0.75, 0)
        assert outputs[:4] == [None] * 4 and message in outputs[-1]

    folder = published_folder(tmp_path / "hub", tiny_config)
    predict = page_function(app.build(str(folder)))
    (tmp_path / "broken.png").write_text("not an image")
    for path, message in ((str(tmp_path / "broken.png"), "cannot read broken.png as an image"),
                          (None, "upload an image or pick an example"),
                          (str(ROOT / "demo" / "examples" / "cat.png"), "leaves no visible patch")):
        outputs = predict(path, 0.95 if message == "leaves no visible patch" else 0.75, 0)
        assert outputs[:4] == [None] * 4 and outputs[-1].startswith("**Error:**") and message in outputs[-1]
    outputs = predict(str(ROOT / "demo" / "examples" / "cat.png"), 0.5, 0)
    assert [picture.size for picture in outputs[:4]] == [(256, 256)] * 4
    assert set(outputs[5]) == set(LABELS.values()) and outputs[-1].startswith("Done in")


def test_demo_flags_and_one_queue(tmp_path, tiny_config, capsys):
    app = load_app()
    for flags in (["--measure", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            app.main(["--model", str(tmp_path), *flags])  # refused before loading or serving
        assert exit_info.value.code == 2 and f"{flags[0]} must be a positive number" in capsys.readouterr().err
    # Every trigger runs in one queue of one: a run sets the model's mask ratio for its own call.
    page = app.build(str(published_folder(tmp_path / "hub", tiny_config)))
    runs = [block for block in page.fns.values() if block.fn.__name__ == "predict"]
    assert len(runs) == 4 and {(block.concurrency_id, block.concurrency_limit) for block in runs} == {("model", 1)}


def test_demo_serves_one_named_endpoint_and_offers_share(served_app, tmp_path):
    """The page's API has one endpoint, named (/reconstruct, not /predict, /predict_1, ...); the app says where it
    serves and offers its own --share flag instead of Gradio's "set `share=True` in `launch()`", which a user of the
    app cannot do."""
    info = json.loads(urllib.request.urlopen(served_app + "gradio_api/info", timeout=10).read())
    assert list(info["named_endpoints"]) == ["/reconstruct"] and not info["unnamed_endpoints"]
    log = wait_for(lambda: "[demo] serving on" in (tmp_path / "app.log").read_text() and
                   (tmp_path / "app.log").read_text(), "the app's serving line")
    assert f"[demo] serving on {served_app}" in log and "--share" in log and "share=True" not in log


def test_demo_takes_the_precision_rule(tmp_path, tiny_config, monkeypatch, capsys):
    app = load_app()
    assert Path(app.precision.__file__).resolve() == ROOT / "mae_hf" / "precision.py"  # the package's own rule
    folder = published_folder(tmp_path / "hub", tiny_config)
    assert (folder / "precision.py").read_bytes() == (ROOT / "mae_hf" / "precision.py").read_bytes()  # the Space's
    image = Image.open(ROOT / "demo" / "examples" / "cat.png")
    results = {}
    for capabilities, bf16 in (({"avx512_bf16": True}, None), ({"avx2": True}, None), ({"avx2": True}, False)):
        monkeypatch.setattr(app.precision, "cpu_capabilities", lambda capabilities=capabilities: capabilities)
        demo = app.Demo(str(folder), bf16)
        assert demo.precision in demo.describe()
        expected = torch.bfloat16 if demo.precision.startswith("bf16") else torch.float32
        assert {next(model.parameters()).dtype for model in [demo.mae, demo.classifiers["linear probe"][0]]} == {
            expected}  # converted once, not cast again for every image
        results[demo.precision] = demo.run(image, 0.5, 0)
    assert list(results) == ["bf16 weights (default: this CPU computes bf16 natively, AVX512-BF16)",
                             "fp32 (default: this CPU has no native bf16, where bf16 runs slower than fp32)",
                             "fp32 (--no-bf16)"]  # the flag as the demo spells it
    (bf16_pictures, _, bf16_top5), (fp32_pictures, _, fp32_top5), _ = results.values()
    assert [picture.size for picture in bf16_pictures] == [picture.size for picture in fp32_pictures]
    assert set(bf16_top5["linear probe"]) == set(fp32_top5["linear probe"]) == set(LABELS.values())
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(folder), "--bf16", "maybe"])
    assert exit_info.value.code == 2 and "--bf16" in capsys.readouterr().err
