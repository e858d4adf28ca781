"""``ted-prep``: train a tokenizer, build packed token shards, verify and inspect them.

Examples::

    ted-prep tokenizer --input corpus/ --vocab-size 32000 --model-type bpe --out tok/
    ted-prep build --input 'corpus/*.jsonl.zst' --tokenizer tok/ --out shards/ --workers 8
    ted-prep verify shards/
    ted-prep inspect shards/
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep.errors import UserError, run_cli

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "enwiki_sample.txt.gz")


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories, globs or datasets directories (.txt, .jsonl, .parquet; "
                        ".gz/.zst allowed). The word 'sample' names the bundled Wikipedia sample.")
    p.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, datasets)")
    p.add_argument("--blank-line-docs", action="store_true",
                   help=".txt documents are separated by blank lines (default: one document per line)")
    p.add_argument("--hf-split", default="train", help="split to read from a saved DatasetDict")
    p.add_argument("--strict", action="store_true",
                   help="fail on invalid UTF-8 (default: replace with U+FFFD and count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ted-prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train a LLaMA-style SentencePiece tokenizer on a corpus",
                       description="Train SentencePiece (its own trainer) and write a directory that "
                                   "transformers.AutoTokenizer loads, with <unk>=0, <s>=1, </s>=2.")
    _input_args(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sample at most this many lines for training (default 2M)")
    p.add_argument("--out", required=True, help="output tokenizer directory (must not exist or be empty)")

    p = sub.add_parser("build", help="tokenize a corpus into packed Megatron-format shards",
                       description="Tokenize documents (EOS after each), split train/valid by a hash of each "
                                   "document, and write MMIDIDX shards plus manifest.json. Re-running the same "
                                   "command after an interruption finishes the job; output bytes do not depend "
                                   "on --workers.")
    _input_args(p)
    p.add_argument("--tokenizer", required=True, help="any Hugging Face tokenizer directory")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents for validation")
    p.add_argument("--seed", type=int, default=1234, help="key of the train/valid split hash")
    p.add_argument("--shard-mb", type=float, default=256.0, help="text megabytes per shard (default 256)")
    p.add_argument("--index-codes", choices=("megatron", "deepspeed"), default="megatron",
                   help="dtype code table of the .idx header: megatron (Megatron-LM, GPT-NeoX) or deepspeed "
                        "(deepspeed.runtime.data_pipeline MMapIndexedDataset); they disagree for uint16")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend the tokenizer's BOS to every document (LLaMA convention); recorded in the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing ted-prep build in --out that was made from other inputs/options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("verify", help="check shard sizes, index consistency and checksums")
    p.add_argument("data_dir")
    p.add_argument("--no-checksums", action="store_true", help="skip sha256 (structure and sizes only)")

    p = sub.add_parser("inspect", help="print counts and decode sample documents")
    p.add_argument("data_dir")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the copy inside the dataset)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--chars", type=int, default=400)
    return parser


def _expand_inputs(inputs: list[str]) -> list[str]:
    return [SAMPLE_CORPUS if x == "sample" else x for x in inputs]


def run(args: argparse.Namespace) -> int:
    if args.command == "tokenizer":
        from data_prep.sources import ReadOptions, iter_texts, resolve_sources
        from data_prep.tokenizer import train_sentencepiece

        if args.vocab_size < 300:
            raise UserError(f"--vocab-size must be ≥ 300 (byte fallback alone needs 259), got {args.vocab_size}")
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise UserError(f"--out {args.out} exists and is not empty")
        sources = resolve_sources(_expand_inputs(args.input))
        texts = iter_texts(sources, ReadOptions(args.text_field, args.blank_line_docs, args.strict, args.hf_split))
        lines = (line for text in texts for line in text.split("\n") if line.strip())
        train_sentencepiece(lines, args.out, args.vocab_size, args.model_type, args.max_sentences)
        print(f"ted-prep: wrote {args.model_type} tokenizer with {args.vocab_size} pieces to {args.out}",
              file=sys.stderr)
    elif args.command == "build":
        from data_prep.build import BuildOptions, build

        build(BuildOptions(
            inputs=_expand_inputs(args.input), tokenizer=args.tokenizer, out=args.out, workers=args.workers,
            valid_fraction=args.valid_fraction, seed=args.seed, text_field=args.text_field,
            blank_line_docs=args.blank_line_docs, strict=args.strict, hf_split=args.hf_split,
            shard_mb=args.shard_mb, index_codes=args.index_codes, add_bos=args.add_bos, overwrite=args.overwrite,
            progress=not args.no_progress,
        ))
    elif args.command == "verify":
        from data_prep.verify import verify_dataset

        manifest = verify_dataset(args.data_dir, checksums=not args.no_checksums)
        n = sum(len(v) for v in manifest["shards"].values())
        print(f"ted-prep: {args.data_dir}: all {n} shards OK")
    elif args.command == "inspect":
        from data_prep.verify import describe

        print(describe(args.data_dir, args.tokenizer, args.samples, args.chars))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("ted-prep", lambda: run(args), "interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
