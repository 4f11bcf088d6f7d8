"""CPU speed settings the scripts apply: freed memory kept for reuse (mae_hf.cli.keep_freed_memory)."""

import os
import platform
import subprocess
import sys

import pytest

# A train step in miniature: blocks of activations (some above glibc's largest mmap threshold, 32 MB) allocated,
# written and freed, round after round; the page faults of the last rounds say whether the memory went back to the
# kernel in between (each fresh 4 KB page faults once). The quietest of the later rounds counts: on a busy machine
# one round can fault a block in again (seen once in CI: 10,240 faults, one 40 MB block, over two rounds).
FAULTS = r'''
import resource, torch
from mae_hf.cli import keep_freed_memory
applied = keep_freed_memory()
faults = []
for round in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(megabytes * 2**18, dtype=torch.float32).fill_(1.0) for megabytes in (48, 48, 8, 40)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[3:]))
'''


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt); a no-op elsewhere")
def test_freed_memory_is_reused_without_page_faults():
    def faults(setting: str) -> tuple[str, int]:
        environment = dict(os.environ, MAE_HF_KEEP_FREED_MEMORY=setting, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=environment,
                                check=True)
        applied, count = result.stdout.split()
        return applied, int(count)

    kept, default = faults("1"), faults("0")
    assert kept[0] == "True" and default[0] == "False"
    assert default[1] > 30_000  # 144 MB of fresh pages in every round
    assert kept[1] < 1_000


def test_the_memory_setting_reads_on_and_off_and_names_a_value_it_does_not_know(monkeypatch, capsys):
    from mae_hf.cli import keep_freed_memory_requested

    for value, kept in (("0", False), ("off", False), ("No", False), ("1", True), ("on", True), ("", True)):
        monkeypatch.setenv("MAE_HF_KEEP_FREED_MEMORY", value)
        assert keep_freed_memory_requested(warn=True) is kept, value
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MAE_HF_KEEP_FREED_MEMORY", "garbage")
    assert keep_freed_memory_requested(warn=True) is True
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "'garbage' is neither 1" in warning and "kept the default" in warning
