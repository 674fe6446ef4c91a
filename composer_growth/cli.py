"""``composer-growth prepare-data | train | validate | plan | export``."""

from __future__ import annotations

import argparse
import os
import sys

from composer_growth.errors import ConfigError


def _prepare(args: argparse.Namespace) -> int:
    from composer_growth.data.prepare import prepare_dataset

    manifest = prepare_dataset(
        args.out, source=args.source, seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        max_bytes=args.max_bytes, val_percent=args.val_percent, files=args.files, hub_name=args.hub_name,
        hub_split=args.hub_split, text_field=args.text_field, overwrite=args.overwrite, column=args.column,
    )
    for name, stats in manifest["splits"].items():
        print(f"{name:>6}: {stats['documents']:>7} documents {stats['sequences']:>8} sequences "
              f"{stats['tokens']:>11,} tokens")
    return 0


def _validate(args: argparse.Namespace):
    from composer_growth.plan import is_foundry, validate_foundry
    from composer_growth.recipe import load_recipe, validate

    data = load_recipe(args.recipe, args.overrides)
    if not is_foundry(data):
        return validate(data)
    if args.cmd == "train":
        raise ConfigError("recipe", args.recipe, "one of our recipes; an llm-foundry train YAML trains with "
                          "llm-foundry's train.py (validate and plan read it)")
    facts, algs = validate_foundry(data)
    print(f"{args.recipe}: ok (llm-foundry YAML, {len(algs)} algorithms, max_duration {facts.max_duration})")
    return None


def _plan(args: argparse.Namespace) -> int:
    from composer_growth.plan import draw_plan, format_plan, plan_file, write_plan

    result = plan_file(args.recipe, args.overrides)
    print(format_plan(result))
    if args.suggest:
        from composer_growth.suggest import format_suggestion, suggest

        result["suggest"] = suggest(result)
        print("\n" + format_suggestion(result["suggest"]))
    out = args.out or os.path.join("runs", "plan", os.path.splitext(os.path.basename(args.recipe))[0])
    write_plan(result, os.path.join(out, "plan.json"))
    print(f"\nwrote {os.path.join(out, 'plan.json')}")
    if not args.no_png:
        why = draw_plan(result, os.path.join(out, "plan.png"))
        print(f"no picture: {why}" if why else f"wrote {os.path.join(out, 'plan.png')}")
    return 0


def one_line(e: BaseException) -> str:
    """An unexpected failure in one line: a file system error with its path, anything else with its type."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}" + (f" -> {e.filename2}" if e.filename2 else "")
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback instead of one line")
    parser = argparse.ArgumentParser(prog="composer-growth", description=__doc__, parents=[debug])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare-data", help="build a tokenizer and MDS shards from a corpus", parents=[debug])
    p.add_argument("--out", default="./data/python-source")
    p.add_argument("--source", default="python-source", choices=["python-source", "files", "hub"])
    p.add_argument("--files", nargs="*", default=None, help="text or JSONL files (source=files)")
    p.add_argument("--hub-name", default=None)
    p.add_argument("--hub-split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", default=None, help="AutoTokenizer name or path; default: train a BPE here")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-bytes", type=int, default=8_000_000)
    p.add_argument("--val-percent", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--column", default="input_ids", choices=["input_ids", "tokens"],
                   help="the token column: input_ids, or tokens (llm-foundry's text loader reads it; so do ours)")

    for name, text in (("train", "validate a recipe and train"), ("validate", "only validate a recipe")):
        q = sub.add_parser(name, help=text, parents=[debug])
        q.add_argument("recipe")
        q.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")

    q = sub.add_parser("plan", help="print and draw what a recipe (or an llm-foundry YAML) will do; trains nothing",
                       parents=[debug])
    q.add_argument("recipe")
    q.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    q.add_argument("--out", default=None, help="folder for plan.json and plan.png (default: ./runs/plan/<recipe name>)")
    q.add_argument("--no-png", action="store_true", help="write no picture")
    q.add_argument("--suggest", action="store_true",
                   help="also print G_stack's guideline (when to grow, by how much) next to the recipe's choice")

    q = sub.add_parser("export", help="a run's Composer checkpoint as a plain HF folder (adapters merged), and "
                       "the grown model block for llm-foundry YAMLs and recipes", parents=[debug])
    q.add_argument("checkpoint")
    q.add_argument("out")
    q.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a checkpoint torch.load(weights_only=True) cannot read (only files you trust)")
    q.add_argument("--config", default=None, help="the model's config.json, where the checkpoint records none")
    q.add_argument("--lora-alpha", type=float, default=None,
                   help="alpha of adapters added mid-run (lora_merge start_at, stack_lora), to merge them")

    args = parser.parse_args(argv)
    if getattr(args, "debug", False) or os.environ.get("COMPOSER_GROWTH_DEBUG") == "1":
        return _dispatch(args)
    from composer_growth.errors import DataError
    from composer_growth.recipe.checkpoints import CheckpointError

    try:
        return _dispatch(args)
    except (ConfigError, CheckpointError, DataError) as e:  # the user's input: the line says what to change
        print(f"composer-growth: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every failure ends in one line; --debug shows the traceback
        print(f"composer-growth: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "prepare-data":
        return _prepare(args)
    if args.cmd == "plan":
        return _plan(args)
    if args.cmd == "export":
        from composer_growth.checkpoint_export import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.out, args.trust_checkpoint, args.config, args.lora_alpha))
        return 0
    plan = _validate(args)
    if plan is None:  # an llm-foundry YAML, validated
        return 0
    if args.cmd == "validate":
        print(f"{args.recipe}: ok ({len(plan.algorithms)} algorithms, max_duration {plan.recipe.max_duration})")
        return 0
    from composer_growth.recipe import run

    run(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
