"""Command line: `python -m api serve | ingest PATH... | export-model` (also `rag-api`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from api.config import get_settings


def _serve() -> int:
    from api.runner import serve

    return serve(get_settings())


def _ingest(paths: list[Path]) -> int:
    from tqdm import tqdm

    from api.ingest import EmptyDocument, iter_files
    from api.loaders import UnreadableDocument, UnsupportedFileType
    from api.services import Services
    from api.store import EmbeddedStoreBusy, StoreUnavailable
    from api.telemetry import configure_logging

    settings = get_settings()
    configure_logging("warning", "console")
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"error: no such file or directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    files = iter_files(paths)
    if not files:
        print("error: no .txt, .md, .pdf or .html files found", file=sys.stderr)
        return 2
    try:
        services = Services.start(settings)
    except EmbeddedStoreBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    created = unchanged = 0
    failed: dict[str, str] = {}
    try:
        with tqdm(files, unit="file", desc="ingest") as bar:
            for path in bar:
                try:
                    result = services.ingestor.ingest_file(path, str(path), "cli")
                except (UnreadableDocument, UnsupportedFileType, EmptyDocument, OSError) as exc:
                    failed[str(path)] = str(exc)
                    continue
                except StoreUnavailable as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
                created += result.status == "created"
                unchanged += result.status == "unchanged"
    finally:
        asyncio.run(services.aclose())
    print(f"{created} created, {unchanged} unchanged, {len(failed)} failed")
    for path_name, reason in failed.items():
        print(f"  failed: {path_name}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _export_model(force: bool) -> int:
    from api.embeddings import export_model

    target = export_model(get_settings().model_dir, force=force)
    print(f"ONNX model ready in {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rag-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="serve the HTTP API with gunicorn, and the local LLM unless "
        "LLM_BASE_URL is set (settings from env)",
    )
    ingest = sub.add_parser("ingest", help="ingest files or folders into the vector store")
    ingest.add_argument("paths", nargs="+", type=Path)
    export = sub.add_parser("export-model", help="export the embedding model to ONNX")
    export.add_argument("--force", action="store_true", help="export even if up to date")
    args = parser.parse_args(argv)
    try:
        get_settings()
    except ValidationError as exc:  # a setting from the environment or .env
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            print(f"error: {name}: {error['msg']}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve()
    if args.command == "ingest":
        return _ingest(args.paths)
    return _export_model(args.force)


if __name__ == "__main__":
    sys.exit(main())
