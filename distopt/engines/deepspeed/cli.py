"""``python -m distopt.deepspeed``: the checkpoint converter's command line."""

from __future__ import annotations

from .checkpoint import convert_checkpoint


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distopt.deepspeed",
                                     description="Tools for distopt optimizers under DeepSpeed ZeRO.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="merge a ZeRO checkpoint into one file loadable on any data-parallel size")
    conv.add_argument("checkpoint", help="the directory given to engine.save_checkpoint")
    conv.add_argument("out", help="output file (.pt)")
    conv.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = parser.parse_args(argv)
    if args.command == "convert":
        out = convert_checkpoint(args.checkpoint, args.out, args.tag)
        print(f"wrote {out}; resume with distopt.deepspeed.load_full_state(engine, {out!r})")
    return 0
