"""``flux2-dit store verify|convert``: check an embedding store's checksums; rewrite a version 1 store as version 2."""

from __future__ import annotations

import argparse
import logging

from dit_client.commands.common_args import add_encoder_args, encoder_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="check (verify) or upgrade (convert) an embedding store made by flux2-dit precompute",
        description="Work on an embedding store directory made by `flux2-dit precompute`.",
    )
    actions = p.add_subparsers(dest="store_command", required=True)
    verify = actions.add_parser(
        "verify",
        help="check the pad table's two copies, every shard and every embedding's CRC-32C; list the damaged captions",
        description="Read the whole store once and check both copies of its pad table, every shard and every "
        "embedding's CRC-32C. Exit 0 when all is well, 1 with one line per damaged shard (and its captions) or "
        "pad table copy otherwise; `flux2-dit precompute` on the same store encodes exactly those captions "
        "again, and --repair restores the pad table.",
    )
    verify.add_argument("dir", metavar="DIR", help="the store directory")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="first rewrite a damaged or missing pad table copy from the sound one; when both are unsound, "
        "fetch the table again from --encoder (a server whose model has the store's table id)",
    )
    add_encoder_args(verify, required=False)
    verify.set_defaults(run=run_verify)
    convert = actions.add_parser(
        "convert",
        help="rewrite a version 1 store (full 512-row embeddings) as version 2 (real rows + checksums), in place",
        description="Rewrite a version 1 store as version 2 in place: real rows only, a CRC-32C per embedding, "
        "the pad table read off the store's own embeddings. Safe to interrupt and run again; every embedding "
        "is checked to rebuild bit for bit before the store switches over.",
    )
    convert.add_argument("dir", metavar="DIR", help="the store directory")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(run=run_convert)


def run_verify(args: argparse.Namespace) -> int:
    from dit_client.training.store import PadTableLost, verify_store

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fetch_table = None
    if args.repair and args.encoder:

        def fetch_table(lost: PadTableLost):
            from dit_client.training.precompute import pad_table_from_server

            with encoder_from_args(args) as enc:
                return pad_table_from_server(enc, lost)

    report = verify_store(args.dir, progress=not args.no_progress, repair=args.repair, fetch_table=fetch_table)
    for name in report.pad_table_restored:
        print(f"{report.path}: {name}: restored")
    checked = "structure only: version 1 has no checksums" if report.version == 1 else "every CRC-32C"
    if report.ok:
        print(f"{report.path}: {report.captions} captions in {report.shards} shards, all sound ({checked})")
        return 0
    for name, fault in report.pad_table_faults:
        print(f"{report.path}: {name}: {fault}")
    if report.pad_table_lost:
        print(
            f"{report.path}: no sound copy of the pad table: no embedding can be rebuilt; "
            f"`flux2-dit store verify --repair {report.path} --encoder HOST:PORT` fetches it again from a server "
            "with the store's model"
        )
    elif report.pad_table_faults:
        print(f"{report.path}: the other pad table copy is sound; `flux2-dit store verify --repair` restores this one")
    if not report.damaged:
        return 1
    for damaged in report.damaged:
        shown = ", ".join(repr(c[:60]) for c in damaged.captions[:10])
        more = f" and {len(damaged.captions) - 10} more" if len(damaged.captions) > 10 else ""
        print(f"{report.path}: {damaged.file}: {damaged.reason}; captions: {shown or '(unreadable)'}{more}")
    print(
        f"{report.path}: {len(report.bad_captions)} damaged captions in {len(report.damaged)} of {report.shards} "
        "shards; `flux2-dit precompute` on this store encodes them again"
    )
    return 1


def run_convert(args: argparse.Namespace) -> int:
    from dit_client.training.store import convert_store

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = convert_store(args.dir, progress=not args.no_progress)
    if not report.converted:
        print(f"{report.path}: already a version 2 store ({report.captions} captions); nothing to do")
        return 0
    skipped = f", {report.skipped} captions of damaged shards left out" if report.skipped else ""
    print(
        f"{report.path}: converted to version 2, {report.captions} captions{skipped}; "
        f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB, "
        f"pad table {report.pad_table or '(none)'}"
    )
    return 0
