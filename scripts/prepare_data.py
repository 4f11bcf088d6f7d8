"""Prepare images once for training from disk: decoded, scaled and stored in shards (resumable, in parallel).

    python scripts/prepare_data.py --train_dir imagenet/train --validation_dir imagenet/val --output_dir imagenet_256
    python scripts/prepare_data.py --dataset_name ../shared/data/cifar10 --short_side 32 --output_dir cifar10_32

Each image is scaled so that its short side is at most 256 by default (aspect kept) and stored as JPEG bytes (raw
bytes for short sides up to 64) in shards that `datasets` memory-maps; training reads them in DataLoader workers
(docs/data.md). Any data the other scripts read works (Hub id, parquet, image folders, save_to_disk). Interrupted?
Run the same command again: finished shards are kept. Then train from the folder: --dataset_name imagenet_256.
"""

import sys

from mae_hf.cli import parse_args, run_script
from mae_hf.data.arguments import SourceArguments
from mae_hf.data.prepare import PrepareArguments, prepare
from mae_hf.redaction import recorded_command


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    source, args = parse_args((SourceArguments, PrepareArguments), argv, description=__doc__)
    prepare(source, args, recorded_command(["scripts/prepare_data.py", *argv]))  # tokens redacted


if __name__ == "__main__":
    run_script(main)
