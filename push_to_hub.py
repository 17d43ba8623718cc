"""Publish a trained round folder to the Hub as one commit on `main`, tagged `round-N`.

    python push_to_hub.py runs/round-2 --repo-id OWNER/NAME [--round N] [--dry-run] [--force] [--private]
                          [--export llava]   # also publish a plain transformers Llava model to OWNER/NAME-llava

The token comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it; it is never printed.
Re-running a push finishes it: a round already published with exactly these files exits 0 and says so.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("round_dir", help="round folder written by training (MultimodalModel.save_pretrained)")
    parser.add_argument("--repo-id", required=True, help="model repo on the Hub, OWNER/NAME")
    parser.add_argument("--round", type=int, help="round number (default: round.round in the folder's config.json)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be sent and print the card; send nothing")
    parser.add_argument("--force", action="store_true", help="republish a round whose tag exists and move the tag")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet); "
                        "an --export repo is created private whenever the round's repo is")
    parser.add_argument("--export", choices=["llava"], help="also export the round as a LlavaForConditionalGeneration "
                        "and publish it to OWNER/NAME-llava, tagged round-N (mmft.export_hub)")
    args = parser.parse_args(argv)
    from mmft.hub import error_line, plan_upload, publish  # after parsing: --help stays instant

    try:
        upload = plan_upload(args.round_dir, args.repo_id, args.round)
        for warning in upload.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.export:
            from mmft.card import check_repo_id
            from mmft.export_hub import check_round_exportable, export_repo_id

            check_round_exportable(args.round_dir)  # a pooled round is refused before anything is sent
            check_repo_id(export_repo_id(upload.repo_id), "--repo-id with '-llava' added (the export's repo)")
        if args.dry_run:
            print(f"Dry run, nothing sent. {upload.repo_id}: one commit on main, tagged {upload.tag}, adding:")
            for path, size in upload.listing():
                print(f"  {path:<40} {size:>12,} bytes")
            print("and deleting whatever else main holds (except .gitattributes).\n")
            print(upload.card)
            if args.export:
                _dry_run_export(args.round_dir, upload)
            return 0
        if args.export:
            from mmft.export_hub import check_export_visibility

            check_export_visibility(upload.repo_id, args.private)  # a public copy of a private round: refused now
        print(f"Publishing {args.round_dir} to {upload.repo_id} as {upload.tag} ({len(upload.listing())} files)...")
        done = publish(upload, force=args.force, private=args.private)
    except Exception as err:  # one readable line, no traceback (and so no local variables) on the console
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    if args.export:
        from mmft.export_hub import publish_export

        print(f"Exporting {args.round_dir} as a Llava model and publishing it...")
        try:
            exported = publish_export(args.round_dir, upload.repo_id, upload.round, force=args.force,
                                      private=args.private)
        except Exception as err:  # the round itself is up: say where, then why the export is not
            _published(done)
            print(f"error: the round is published, its export is not: {error_line(err)} (run the same command "
                  "again: the round is reported as already published, and the export is retried)", file=sys.stderr)
            return 1
        print(f"export:   {exported.repo_id} at {exported.tag}, commit {exported.commit_id}, {exported.url}")
    _published(done)
    return 0


def _published(done) -> None:
    """The round's own lines, last on stdout (scripts read them there)."""
    if done.already:
        print(f"already published, identical: {done.tag} holds exactly these files; nothing was sent.")
    print(f"revision: {done.tag}")
    print(f"commit:   {done.commit_id}")
    print(f"url:      {done.url}")


def _dry_run_export(round_dir, upload) -> None:
    import tempfile

    from mmft.export_hub import plan_export_upload

    with tempfile.TemporaryDirectory() as tmp:
        export = plan_export_upload(round_dir, upload.repo_id, upload.round, tmp)
        print(f"\nand {export.repo_id}: one commit on main, tagged {export.tag}, adding:")
        for path, size in export.listing():
            print(f"  {path:<40} {size:>12,} bytes")


if __name__ == "__main__":
    sys.exit(main())
