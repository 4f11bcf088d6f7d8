"""Command-line parsing shared by the scripts: `HfArgumentParser` over dataclasses, from flags, from a JSON/YAML
file, or from a file followed by flags that override it."""

import json
import os
import sys

from transformers import HfArgumentParser


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None):
    """`script.py [CONFIG.json|CONFIG.yaml] [--flag value ...]`: the file gives defaults, flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        path = argv.pop(0)
        if not os.path.isfile(path):
            parser.error(f"config file {path} does not exist.")
        with open(path) as handle:
            if path.endswith(".json"):
                values = json.load(handle)
            else:
                import yaml

                values = yaml.safe_load(handle)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{path}: unknown option(s) {unknown}.")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    try:
        return parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # an argument dataclass refused a value: a usage error, not a traceback
        parser.error(str(error))


def parse_overrides(text: str | None) -> dict:
    """`"hidden_size=128,norm_pix_loss=true,mask_ratio=0.6"` -> typed dict (int, float, bool, None or str)."""
    values = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value.")
        key, raw = (part.strip() for part in item.split("=", 1))
        lowered = raw.lower()
        if lowered in ("true", "false"):
            values[key] = lowered == "true"
        elif lowered in ("none", "null"):
            values[key] = None
        else:
            for cast in (int, float):
                try:
                    values[key] = cast(raw)
                    break
                except ValueError:
                    continue
            else:
                values[key] = raw
    return values
