"""``libmoe data``: check record files, prepare/verify datasets from manifests, build easyvqa."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("data", help="check, prepare and verify datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    c = dsub.add_parser("check", help="report every bad record of LLaVA-format JSON/JSONL files")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--image-folder", help="folder the records' image paths are relative to")
    c.add_argument("--decode", action="store_true", help="decode every image fully (slower)")
    c.add_argument("--tokenizer", help="local tokenizer folder, to check lengths")
    c.add_argument("--template", help="conversation template for the length check")
    c.add_argument("--max-length", type=int, help="max tokens after image expansion")
    c.add_argument("--num-image-tokens", type=int, default=576, help="tokens per image (default 576)")
    c.add_argument("--limit", type=int, default=None, help="print at most N problems")
    c.set_defaults(func=run_check)

    lst = dsub.add_parser("list", help="list dataset manifests")
    lst.set_defaults(func=run_list)

    for action, helptext in (("prepare", "download a dataset (or say what to fetch when offline)"),
                             ("verify", "check a local copy against its manifest")):
        a = dsub.add_parser(action, help=helptext)
        a.add_argument("name", nargs="?", help="manifest name (see `libmoe data list`)")
        a.add_argument("--manifest", help="manifest YAML file instead of a name")
        a.add_argument("--root", required=True, help="data root folder")
        if action == "verify":
            a.add_argument("--image-sample", type=int, default=None, help="open at most N images (default all)")
            a.add_argument("--no-decode", dest="decode", action="store_false",
                           help="open images by header only (faster; a truncated JPEG passes)")
            a.set_defaults(func=run_verify)
        else:
            a.set_defaults(func=run_prepare)

    b = dsub.add_parser("build-easyvqa", help="build the embedded easyvqa dataset offline")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--max-images", type=int, default=None, help="first N images per split (quick runs)")
    b.add_argument("--qa-per-record", type=int, default=1, help="questions per SFT record (multi-turn if > 1)")
    b.set_defaults(func=run_build_easyvqa)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_check(args) -> int:
    from ..data.validate import check_file

    tokenizer = None
    if args.tokenizer:
        if not (args.template and args.max_length):
            print("--tokenizer needs --template and --max-length", file=sys.stderr)
            return 2
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    bad = False
    for path in args.paths:
        _, report = check_file(path, args.image_folder, decode=args.decode, tokenizer=tokenizer,
                               template=args.template, max_length=args.max_length,
                               num_image_tokens=args.num_image_tokens)
        print(report.format(limit=args.limit))
        bad |= not report.ok
    return 1 if bad else 0


def run_list(args) -> int:
    from ..data.manifests import list_manifests, load_manifest

    for name in list_manifests():
        m = load_manifest(name)
        print(f"{name:<24} {m.data.get('stage', ''):<9} {m.data.get('title', '')}")
    return 0


def _manifest(args):
    from ..data.manifests import load_manifest

    if not (args.name or args.manifest):
        raise SystemExit("give a manifest NAME or --manifest FILE")
    return load_manifest(args.manifest or args.name)


def run_prepare(args) -> int:
    from ..data.manifests import ManifestError, PrepareError, prepare_manifest

    try:
        out = prepare_manifest(_manifest(args), args.root)
    except (ManifestError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in out))
    return 0


def run_verify(args) -> int:
    from ..data.manifests import ManifestError, verify_manifest

    try:
        manifest = _manifest(args)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = verify_manifest(manifest, args.root, image_sample=args.image_sample, decode=args.decode)
    print(report.format())
    return 0 if report.ok else 1


def run_build_easyvqa(args) -> int:
    import json

    from ..data.easyvqa import build_easyvqa

    try:
        meta = build_easyvqa(args.out_dir, max_images=args.max_images, qa_per_record=args.qa_per_record)
    except ValueError as e:
        print(f"libmoe data build-easyvqa: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta["splits"], indent=1))
    print(f"written to {args.out_dir}")
    return 0
