"""Result files of the evaluation protocols (`<protocol>_results.json`) and the tables built from them.

Every number in a table or model card comes from these files, which the scripts write after measuring."""

import glob
import json
import os

PROTOCOL_ROWS = (  # (row title, protocol, accuracy key)
    ("Linear probe (frozen encoder, BatchNorm + linear head)", "linear_probe", "eval_accuracy"),
    ("kNN, k = 20 (frozen encoder, cosine, weighted votes)", "knn", "eval_accuracy_k20"),
    ("kNN, k = 200", "knn", "eval_accuracy_k200"),
    ("Fine-tune (whole encoder trained)", "finetune", "eval_accuracy"),
)
ENCODERS = (("random_init", "Random-init encoder"), ("pretrained", "MAE-pretrained encoder"))


def write_results(output_dir: str, name: str, results: dict) -> str:
    """Write `<output_dir>/<name>_results.json` and print a one-line summary."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}_results.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    print(f"[{name}] {results.get('encoder', '')} encoder: eval_accuracy {results['eval_accuracy']:.4f} "
          f"({results.get('eval_samples', '?')} images) -> {path}", flush=True)
    return path


def collect_results(paths) -> list[dict]:
    """Results from result files or from folders searched recursively for `*_results.json` that have a
    `protocol` (the Trainer's own train/eval_results.json files are skipped)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*_results.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder.")
    results = []
    for file in dict.fromkeys(os.path.realpath(file) for file in files):  # each file once, in order
        with open(file) as handle:
            result = json.load(handle)
        if isinstance(result, dict) and "protocol" in result and "eval_accuracy" in result:
            results.append(dict(result, source=file))
    return results


def accuracy_grid(results: list[dict]) -> dict:
    """{(protocol row title, encoder): accuracy} from results; a later result overrides an earlier one."""
    grid = {}
    for result in results:
        for title, protocol, key in PROTOCOL_ROWS:
            if result["protocol"] == protocol and key in result:
                grid[title, result.get("encoder", "pretrained")] = result[key]
    return grid


def results_table(results: list[dict]) -> str:
    """Markdown table: protocols as rows, random-init and pretrained encoders side by side (top-1 %)."""
    grid = accuracy_grid(results)
    if not grid:
        raise ValueError("No protocol results found (expected *_results.json files written by the scripts).")
    lines = ["| Protocol | " + " | ".join(name for _, name in ENCODERS) + " | Gain |",
             "|---|" + "---:|" * (len(ENCODERS) + 1)]
    for title, _, _ in PROTOCOL_ROWS:
        values = [grid.get((title, encoder)) for encoder, _ in ENCODERS]
        if all(value is None for value in values):
            continue
        cells = [f"{100 * value:.2f}" if value is not None else "–" for value in values]
        gain = f"{100 * (values[1] - values[0]):+.2f}" if None not in values else "–"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {gain} |")
    return "\n".join(lines)
