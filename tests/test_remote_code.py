"""Saved folders load with `trust_remote_code=True` in a Python where `mae_hf` cannot be imported.

One subprocess does all the loading (importing transformers costs seconds). It must not see `mae_hf`: if it did, the
registered local classes would win over the copied code files. Removing the repository from PYTHONPATH and cwd is not
enough once the package is installed (an editable install adds a finder to site-packages), and `python -S` would drop
site-packages and transformers with it, `-I` keeps site-packages. So the child first puts a meta-path finder in front
of all others that refuses `mae_hf`, and checks that `import mae_hf` fails.
"""

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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


# ---- the card's install claim ------------------------------------------------------------------------------------

def installed_with(names) -> set[str]:
    """The distributions `pip install NAMES` brings: the named ones and, transitively, what they require (extras
    left out), as installed here."""
    wanted, found = [canonicalize_name(name) for name in names], set()
    while wanted:
        name = wanted.pop()
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(canonicalize_name(requirement.name))
    return found


def environment_of(names, folder) -> str:
    """A site-packages folder holding only the files of `installed_with(names)` (links to this environment's), for a
    `python -S` that adds it to its path: an environment with exactly those packages, as `importlib` and
    `importlib.metadata` see it."""
    os.makedirs(folder)
    for distribution in installed_with(names):
        for file in importlib.metadata.distribution(distribution).files or []:
            top = file.parts[0]
            source = file.locate().parents[len(file.parts) - 1] / top
            if top != ".." and source.exists() and not os.path.lexists(os.path.join(folder, top)):
                os.symlink(source, os.path.join(folder, top))
    return str(folder)


def card_usage(card: str) -> tuple[list[str], str]:
    """(the packages the card's `pip install` line names, its Python blocks in order)."""
    install = re.search(r"^pip install (.+)$", card, re.MULTILINE).group(1)
    names = [re.split(r"[<>=!~\[; ]", word, maxsplit=1)[0] for word in shlex.split(install)]
    code = "\n".join(re.findall(r"```python\n(.*?)```", card, re.DOTALL))
    return names, code


def run_with_only(names, code, tmp_path, tag) -> subprocess.CompletedProcess:
    site = environment_of(names, tmp_path / f"site_{tag}")
    (tmp_path / f"usage_{tag}").mkdir()
    script = tmp_path / f"usage_{tag}" / "usage.py"
    script.write_text(f"import sys\nsys.path.append({site!r})\n{code}\nprint('features', tuple(features.shape))\n")
    env = dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / f"hf_home_{tag}"), PATH=os.environ.get("PATH", ""))
    return subprocess.run([sys.executable, "-S", str(script)], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_cards_usage_runs_with_exactly_the_packages_it_names(pretrained_run, scripts, parquet_folder, tmp_path):
    """The published card's install line and code, run as a user would: a Python with only the packages the card
    names (and what pip installs with them) and no mae_hf, loading the folder by the path the card's code names. One
    package fewer (pillow, which the image processor needs and neither torch nor transformers requires) fails, so
    the claim is checked, not assumed."""
    folder, _ = pretrained_run
    scripts.linear_probe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"),
                               "--probe_epochs", "1", "--knn", "false", "--dataset_name", str(parquet_folder)])
    scripts.publish.main([str(folder), "--probe", str(tmp_path / "probe"), "--output_dir", str(tmp_path / "hub")])
    names, code = card_usage((tmp_path / "hub" / "README.md").read_text())
    assert names == ["torch", "transformers", "pillow"]
    assert "mae_hf" not in installed_with(names) and "datasets" not in installed_with(names)
    result = run_with_only(names, code, tmp_path, "card")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "features (1, 16)" in result.stdout
    result = run_with_only(["torch", "transformers"], code, tmp_path, "without_pillow")
    assert result.returncode != 0 and "PIL" in result.stderr
