#!/usr/bin/env bash
# Build gpu_carry/, what scripts/gpu_check.sh needs on a GPU machine that reaches no network:
#
#   bash scripts/build_gpu_carry.sh                 # from the repository root, on a machine with pip's registry
#
#   gpu_carry/cifar10/train.parquet   CIFAR-10's training split (SOURCE, default ../shared/data/cifar10; with
#                                     CIFAR_IMAGES=N only its first N images, should the whole split not fit)
#   gpu_carry/wheels/*.whl            exactly the packages the GPU machine's image lacks or has too old, for its
#                                     Python 3.12 on x86-64 (pip download --no-deps): transformers at this project's
#                                     minimum (pyproject.toml; the image has 5.17), and datasets and evaluate with the
#                                     two packages of theirs the image lacks (dill, multiprocess), at the versions the
#                                     test suite runs against; and regex (see EXTRA_WHEELS).
#
# Every requirement of the carried wheels is then checked against the carry and the image's packages (IMAGE_HAS
# below, from the device tool's package list of 2026-11-17; versions where the list gives them): a requirement met
# by neither stops the build. Last, the size: the carry plus what travels with the checkout (tracked and untracked,
# not ignored, files) must stay under the device tool's 64 MiB. gpu_carry/ is ignored by git (.gitignore).
set -uo pipefail
CARRY=${CARRY:-gpu_carry}
SOURCE=${SOURCE:-../shared/data/cifar10}
CIFAR_IMAGES=${CIFAR_IMAGES:-}
LIMIT_MIB=64
# Pinned: the versions the test suite runs against (datasets, evaluate) and what they need that the image lacks;
# regex because transformers refuses to import beside one older than 2025.10.22 and the image's version is not known
# here (gpu_check.sh installs a carried wheel only where the machine's own is missing or older).
EXTRA_WHEELS=(datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 regex==2026.12.2)
# The GPU image's packages that the carried wheels need (name or name==version where the list gives a version).
IMAGE_HAS="filelock numpy==2.5.2 pyarrow pandas tqdm xxhash fsspec huggingface-hub==1.33.0 packaging pyyaml requests
tokenizers==0.23.2 typer safetensors==0.8.0 aiohttp torch==2.11.0"

fail() { echo "error: $*" >&2; exit 2; }

[ -f pyproject.toml ] && [ -f scripts/gpu_check.sh ] || fail "run this from the repository root."
transformers_minimum=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d= -f2)
[ -n "$transformers_minimum" ] || fail "pyproject.toml names no transformers>=X.Y requirement."
[ -f "$SOURCE/train.parquet" ] || fail "no $SOURCE/train.parquet: set SOURCE to a folder holding CIFAR-10's" \
    "training split as parquet (columns img and label)."

rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/cifar10"
echo "[carry] wheels: transformers==$transformers_minimum ${EXTRA_WHEELS[*]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$CARRY/wheels" "transformers==$transformers_minimum" "${EXTRA_WHEELS[@]}" \
    || fail "pip download failed (no registry here?); see above."

if [ -n "$CIFAR_IMAGES" ]; then
    python3 - "$SOURCE/train.parquet" "$CARRY/cifar10/train.parquet" "$CIFAR_IMAGES" <<'PYTHON' || exit 2
import sys

import pyarrow.parquet as parquet

source, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
parquet.write_table(parquet.read_table(source).slice(0, count), target)
print(f"[carry] cifar10: the first {count:,} images of {source}")
PYTHON
else
    cp "$SOURCE/train.parquet" "$CARRY/cifar10/train.parquet"
fi

python3 - "$CARRY" "$IMAGE_HAS" "$LIMIT_MIB" <<'PYTHON'
import os
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

carry, image_has, limit_mib = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
python = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
available = {}  # name -> version (None: present, version unknown)
for entry in image_has:
    name, _, version = entry.partition("==")
    available[canonicalize_name(name)] = Version(version) if version else None
wheels = sorted(os.listdir(os.path.join(carry, "wheels")))
for wheel in wheels:
    name, version, _, _ = parse_wheel_filename(wheel)
    available[name] = version
unmet, unknown = [], []
for wheel in wheels:
    with zipfile.ZipFile(os.path.join(carry, "wheels", wheel)) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None and not requirement.marker.evaluate(python):
            continue  # an extra, or another Python
        name = canonicalize_name(requirement.name)
        if name not in available:
            unmet.append(f"{wheel}: {requirement}")
        elif available[name] is None:
            if str(requirement.specifier):
                unknown.append(f"{requirement} ({wheel})")
        elif not requirement.specifier.contains(available[name], prereleases=True):
            unmet.append(f"{wheel}: {requirement} (the image or carry has {available[name]})")
if unmet:
    sys.exit("error: requirements neither the carry nor the GPU image meet:\n  " + "\n  ".join(unmet)
             + "\nAdd their wheels to the carry (scripts/build_gpu_carry.sh).")
print(f"[carry] {len(wheels)} wheels, every requirement met by the carry or the image")
if unknown:
    print("[carry] the image's version unknown here (gpu_check.sh's preflight prints it there): "
          + ", ".join(sorted(set(unknown))))


def size(paths):
    return sum(os.path.getsize(path) for path in paths if os.path.isfile(path) and not os.path.islink(path))


carried = size(os.path.join(folder, name) for folder, _, names in os.walk(carry) for name in names)
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True,
                        capture_output=True).stdout.decode().split("\0")
checkout = size(name for name in listed if name)
total, limit = carried + checkout, limit_mib * 2**20
for name, value in (("carry", carried), ("checkout (tracked + untracked, not ignored)", checkout),
                    ("together", total)):
    print(f"[carry] {name}: {value / 2**20:.1f} MiB ({value:,} bytes)")
if total >= limit:
    sys.exit(f"error: carry + checkout is {total / 2**20:.1f} MiB, over the device tool's {limit_mib} MiB. Carry "
             "fewer images (CIFAR_IMAGES=N) or leave large untracked files out of the checkout.")
print(f"[carry] ready: {carry} ({(limit - total) / 2**20:.1f} MiB to spare). Run: DRY=1 bash scripts/gpu_check.sh")
PYTHON
