"""Saved folders load with `trust_remote_code=True` in a Python where `mae_hf` cannot be imported.

One subprocess does all the loading (importing transformers costs seconds). It must not see `mae_hf`: if it did, the
registered local classes would win over the copied code files. Removing the repository from PYTHONPATH and cwd is not
enough once the package is installed (an editable install adds a finder to site-packages), and `python -S` would drop
site-packages and transformers with it, `-I` keeps site-packages. So the child first puts a meta-path finder in front
of all others that refuses `mae_hf`, and checks that `import mae_hf` fails.
"""

import json
import os
import subprocess
import sys

import torch
from PIL import Image

from mae_hf import MAEForImageClassification, MAEForPreTraining, MAEModel

CHILD = r'''
import sys


class RefuseMaeHf:
    def find_spec(self, name, path=None, target=None):
        if name == "mae_hf" or name.startswith("mae_hf."):
            raise ImportError(f"{name} is hidden from this process")


sys.meta_path.insert(0, RefuseMaeHf())
try:
    import mae_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("mae_hf is importable in the child process")

import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                          AutoModelForPreTraining, pipeline)

root, out_file = sys.argv[1], sys.argv[2]
inputs = torch.load(f"{root}/inputs.pt")
pixel_values, noise, image = inputs["pixel_values"], inputs["noise"], Image.open(f"{root}/image.png")
load = dict(trust_remote_code=True)
out = {"configs": {}, "modules": {}}
with torch.no_grad():
    for name in ("pre", "enc", "cls"):
        out["configs"][name] = AutoConfig.from_pretrained(f"{root}/{name}", **load).to_dict()

    pre = AutoModelForPreTraining.from_pretrained(f"{root}/pre", **load).eval()
    result = pre(pixel_values, noise=noise)
    out["pre"] = [result.loss, result.logits, result.mask, result.ids_restore]

    enc = AutoModel.from_pretrained(f"{root}/enc", **load).eval()
    result = enc(pixel_values)
    out["enc"] = [result.last_hidden_state, result.pooler_output,
                  enc(pixel_values, noise=noise, mask_ratio=0.75).last_hidden_state]

    enc_from_pre = AutoModel.from_pretrained(f"{root}/pre", **load).eval()
    out["enc_from_pre"] = [enc_from_pre(pixel_values).last_hidden_state]

    cls = AutoModelForImageClassification.from_pretrained(f"{root}/cls", **load).eval()
    out["cls"] = [cls(pixel_values).logits]
    out["modules"] = {name: type(model).__module__ for name, model in
                      (("pre", pre), ("enc", enc), ("enc_from_pre", enc_from_pre), ("cls", cls))}

    processor = AutoImageProcessor.from_pretrained(f"{root}/cls", **load)
    out["processed"] = processor(image, return_tensors="pt").pixel_values

    extractor = pipeline("image-feature-extraction", model=f"{root}/enc", **load)
    out["features"] = torch.tensor(extractor(image))
    out["pooled_features"] = torch.tensor(extractor(image, pool=True))
    out["classification"] = pipeline("image-classification", model=f"{root}/cls", **load)(image)
out["mae_hf_imported"] = any(name.split(".")[0] == "mae_hf" for name in sys.modules)
torch.save(out, out_file)
'''


def test_remote_code_loads_without_mae_hf(tmp_path, tiny_config, perturb, pixel_values, noise):
    id2label = {0: "cat", 1: "dog", 2: "ship"}
    models = {
        "pre": perturb(MAEForPreTraining(tiny_config())).eval(),
        "enc": perturb(MAEModel(tiny_config(pooling="mean"))).eval(),
        "cls": perturb(MAEForImageClassification(tiny_config(num_labels=3, id2label=id2label)), scale=0.5).eval(),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    image = Image.fromarray(torch.randint(0, 256, (17, 13, 3), dtype=torch.uint8).numpy())
    image.save(tmp_path / "image.png")
    torch.save({"pixel_values": pixel_values, "noise": noise}, tmp_path / "inputs.pt")
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "cwd").mkdir()

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path), str(tmp_path / "out.pt")],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    out = torch.load(tmp_path / "out.pt", weights_only=False)

    assert out["mae_hf_imported"] is False
    for name, module in out["modules"].items():
        assert module.startswith("transformers_modules."), (name, module)
    for name in models:
        assert out["configs"][name]["model_type"] == "mae_hf"
        assert out["configs"][name]["hidden_size"] == 16
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog",
                                                                                      "2": "ship"}

    def assert_same(expected, actual):
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual):
            assert e.dtype == a.dtype and e.shape == a.shape
            torch.testing.assert_close(a, e, rtol=0, atol=1e-6)

    with torch.no_grad():
        pre = models["pre"](pixel_values, noise=noise)
        assert_same([pre.loss, pre.logits, pre.mask, pre.ids_restore], out["pre"])
        enc = models["enc"](pixel_values)
        masked = models["enc"](pixel_values, noise=noise, mask_ratio=0.75)
        assert_same([enc.last_hidden_state, enc.pooler_output, masked.last_hidden_state], out["enc"])
        assert_same([models["pre"].mae(pixel_values).last_hidden_state], out["enc_from_pre"])
        assert_same([models["cls"](pixel_values).logits], out["cls"])

        processed = models["cls"].image_processor()(image, return_tensors="pt").pixel_values
        assert processed.shape == (1, 3, 8, 8)
        assert_same([processed], [out["processed"]])

        features = models["enc"](processed)
        assert out["features"].shape == (1, 17, 16)
        torch.testing.assert_close(out["features"], features.last_hidden_state, rtol=0, atol=1e-5)
        assert out["pooled_features"].shape == (1, 16)
        torch.testing.assert_close(out["pooled_features"], features.pooler_output, rtol=0, atol=1e-5)

        probabilities = models["cls"](processed).logits.softmax(dim=-1)[0]
    ranking = probabilities.argsort(descending=True).tolist()
    classification = out["classification"]
    assert [entry["label"] for entry in classification] == [id2label[i] for i in ranking]
    torch.testing.assert_close(torch.tensor([entry["score"] for entry in classification]),
                               probabilities[ranking], rtol=0, atol=1e-5)
