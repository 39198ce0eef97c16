"""``dlm-lsp models``: list, pull, locate and remove the catalog's models (``engine.catalog``).

    dlm-lsp models list [--json]
    dlm-lsp models pull NAME [--precision auto|int8|int4|fp32] [--revision REV] [--force]
    dlm-lsp models path NAME [--precision int8|int4|fp32]
    dlm-lsp models remove NAME [--download]

Tables and paths go to stdout (``path`` prints only the folder, for scripts);
progress, download bars and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine import EngineError, catalog, probe
from engine.catalog import size_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``models`` subcommands."""
    sub = parser.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="the catalog: size, licence, quality, what fits this machine, what is here")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--probe", action="store_true", help="measure this CPU again for the expected latency")
    pull = sub.add_parser("pull", help="download (through huggingface_hub), convert and verify a model")
    pull.add_argument("name")
    pull.add_argument("--precision", default="auto", choices=("auto", *catalog.PRECISIONS),
                      help="auto (default): int8 if it passes validation, else fp32; int4: 4-bit weights")
    pull.add_argument("--revision", default=None, help="a branch, tag or commit of the repository (default: main)")
    pull.add_argument("--force", action="store_true", help="convert again even if a converted folder is present")
    where = sub.add_parser("path", help="print the engine folder of a pulled model")
    where.add_argument("name")
    where.add_argument("--precision", default=None, choices=catalog.PRECISIONS)
    remove = sub.add_parser("remove", help="delete a model's converted folders")
    remove.add_argument("name")
    remove.add_argument("--download", action="store_true", help="also delete its files from the Hugging Face cache")


def _gb(n: float) -> str:
    """Table columns: always in GB, so that they line up."""
    return f"{n / 1e9:.1f} GB"


def _rows(free: int | None, refresh_probe: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    known = catalog.entries()  # a malformed team catalog is reported before the probe runs
    figures = probe.probe(catalog.cache_dir() / "probe.json", refresh=refresh_probe)
    rows = []
    for entry in known:
        here = catalog.installed(entry.name)
        expected = (
            probe.expected_ms(entry.parameters, entry.vocab_size, entry.hidden_size, entry.tied, figures)
            if figures and entry.supported
            else None
        )
        rows.append(
            {
                **entry.to_dict(),
                "disk_int8": entry.graph_bytes("int8"),
                "disk_fp32": entry.graph_bytes("fp32"),
                "ram_int8": entry.ram_bytes("int8"),
                "ram_fp32": entry.ram_bytes("fp32"),
                "disk_int4": entry.graph_bytes("int4"),
                "ram_int4": entry.ram_bytes("int4"),
                "fits_ram": None if free is None else entry.ram_bytes("int8") <= free,
                "present": [{"precision": i.precision, "commit": i.commit, "path": str(i.path)} for i in here],
                "expected_cpu_ms": expected,
            }
        )
    return rows, figures


def _list(args: argparse.Namespace) -> int:
    free = probe.available_memory()
    rows, figures = _rows(free, args.probe)
    if args.json:
        print(json.dumps({"models": rows, "available_ram": free, "cpu_probe": figures}, indent=2))
        return 0
    print(f"{'NAME':<18} {'FAMILY':<6} {'PARAMS':>7} {'DOWNLOAD':>9} {'INT8 DISK/RAM':>14} {'FP32 DISK/RAM':>14}  "
          f"{'HERE':<10} {'FITS':<4} {'CPU MS':>13}  LICENCE")
    for row in rows:
        if not row["supported"]:
            print(f"{row['name']:<18} {'-':<6} {row['parameters'] / 1e9:>6.1f}B {'':>9} {'not supported: ' + row['reason']}")
            continue
        here = ",".join(p["precision"] for p in row["present"]) or "-"
        fits = "-" if row["fits_ram"] is None else ("yes" if row["fits_ram"] else "no")
        ms = row["expected_cpu_ms"]
        expect = f"{ms['single_line_ms']:.0f}/{ms['follow_up_ms']:.0f}" if ms else "-"
        print(
            f"{row['name']:<18} {row['family']:<6} {row['parameters'] / 1e9:>6.1f}B {_gb(row['download_bytes']):>9} "
            f"{_gb(row['disk_int8']) + '/' + _gb(row['ram_int8']).split()[0]:>14} "
            f"{_gb(row['disk_fp32']) + '/' + _gb(row['ram_fp32']).split()[0]:>14}  {here:<10} {fits:<4} {expect:>13}  "
            f"{row['licence']}"
        )
    print()
    for row in rows:
        if row["supported"]:
            print(f"{row['name']}: {row['repo']} - {row['good_for']}. {row['quality']}.")
    if free is not None:
        print(f"\nFITS: int8 RAM needed <= the {size_text(free)} this machine has free now.")
    if figures:
        print(f"CPU MS: expected single-line completion at int8 on this CPU ({figures['cpu']}, {figures['threads']} "
              f"threads; 1,024-token window, 10 tokens at 3 per step): a file's first request / a keystroke after it "
              f"(the context pass reused), from a probe measured {figures['measured']} (--probe measures again). "
              "An estimate to choose by, not a benchmark.")
    else:
        print("CPU MS: needs the export extra (pip install -e '.[export]') to probe this CPU.")
    print("Pull one with: dlm-lsp models pull NAME")
    return 0


def _pull(args: argparse.Namespace) -> int:
    folder = catalog.pull(
        args.name,
        precision=args.precision,
        revision=args.revision,
        force=args.force,
        progress=lambda message: print(f"dlm-lsp models: {message}", file=sys.stderr, flush=True),
    )
    print(folder)
    print(f"use it: set the model setting to {args.name!r} (or dlm-lsp check --model {args.name})", file=sys.stderr)
    return 0


def _path(args: argparse.Namespace) -> int:
    print(catalog.path(args.name, args.precision))
    return 0


def _remove(args: argparse.Namespace) -> int:
    freed = catalog.remove(
        args.name, download=args.download, progress=lambda m: print(f"dlm-lsp models: {m}", file=sys.stderr)
    )
    print(f"removed {args.name} ({size_text(freed)} freed)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``models`` subcommand; engine errors become one line on stderr and exit status 2."""
    commands = {"list": _list, "pull": _pull, "path": _path, "remove": _remove}
    try:
        return commands[args.models_command](args)
    except EngineError as exc:
        print(f"dlm-lsp models: error: {exc}", file=sys.stderr)
        return 2
