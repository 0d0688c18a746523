"""make_samples.py regenerates the shipped samples byte for byte, so the committed files and their generator
cannot drift apart (edit the generator, rerun it, commit both)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["raw/MAWPS.csv", "raw/alpaca.json", "raw/cmath_dev.jsonl", "raw/emoji.jsonl", "raw/json_only.jsonl",
           "raw/messages.jsonl", "raw/sharegpt.jsonl", "eval/qa.jsonl"]


def test_make_samples_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "make_samples.py"), "--out", str(tmp_path)], check=True,
                   cwd=tmp_path, stdout=subprocess.DEVNULL)
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert written == sorted(SHIPPED)
    for name in SHIPPED:
        with open(tmp_path / name, "rb") as new, open(os.path.join(ROOT, "dataset", name), "rb") as shipped:
            assert new.read() == shipped.read(), f"dataset/{name} differs from what make_samples.py writes"
