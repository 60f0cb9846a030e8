"""`qwenvl train CONFIG [key=value ...]`: run training from a YAML config (or a bundled recipe name).

Under torchrun (WORLD_SIZE > 1) it trains with FSDP2 across the launched processes:
    torchrun --nproc_per_node 8 -m qwenvl.train.cli sft model=/ckpt/Qwen2.5-VL-7B-Instruct train_files=[data.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import CONFIG_DIR, TrainConfig


def recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenvl train", description="Train Qwen2.5-VL: SFT, LoRA, DPO, staged pretraining.")
    p.add_argument("config", nargs="?", help=f"YAML config file or a bundled recipe ({', '.join(recipes())})")
    p.add_argument("overrides", nargs="*", help="option=value (YAML values, e.g. lr=2e-5 train_files=[a.jsonl])")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config:  # no config file, only overrides
        overrides.insert(0, config)
        config = None
    cfg = TrainConfig.load(config, overrides)
    if args.print_config:
        import yaml
        yaml.safe_dump(cfg.to_dict(), sys.stdout, sort_keys=False)
        return 0
    from .trainer import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
