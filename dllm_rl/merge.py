"""Merge a trained LoRA adapter into its base: ``python -m dllm_rl.merge <adapter dir> <output dir>``.

The result is a full save_pretrained checkpoint (config.json, safetensors, tokenizer) in the base's
own layout, so it loads with ``model.path=<output dir>`` and no PEFT, and is what one ships or
evaluates elsewhere. The adapter directory is any ``checkpoints/<tag>/hf`` of a LoRA run (its
adapter_config.json names the base) or a directory written by ``PeftModel.save_pretrained``;
``--base`` overrides the base it names. The output is written to a temporary directory beside the
target and renamed into place, so an interrupted merge leaves nothing half-written, and an existing
output directory is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dllm_rl.errors import DllmRlError


def merge(
    adapter: str | os.PathLike, output: str | os.PathLike, base: str | None = None, dtype: str = "float32"
) -> Path:
    """Write base + adapter, merged, as a full checkpoint at ``output``; returns its path."""
    from dllm_rl.models.policy import load_pretrained

    out = Path(os.path.expanduser(str(output))).absolute()
    if out.exists():
        raise DllmRlError(f"output={out} already exists (merge never overwrites; remove it or pick another)")
    a = Path(os.path.expanduser(str(adapter)))
    if not (a / "adapter_config.json").is_file():
        raise DllmRlError(f"adapter={a}: no adapter_config.json (expected a saved LoRA adapter)")
    policy = load_pretrained(base, dtype, adapter=a) if base else load_pretrained(a, dtype)
    merged = policy.model.merge_and_unload()
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_rl.merge",
        description="Merge a trained LoRA adapter into its base and write the result as a full save_pretrained "
        "checkpoint (loads with model.path=<output>, no PEFT). The output directory must not exist yet.",
    )
    parser.add_argument("adapter", help="directory with adapter_config.json (e.g. <run>/checkpoints/best/hf)")
    parser.add_argument("output", help="new directory for the merged checkpoint")
    parser.add_argument("--base", default=None, help="base checkpoint directory (default: the one the adapter names)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        out = merge(args.adapter, args.output, args.base, args.dtype)
    except DllmRlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
