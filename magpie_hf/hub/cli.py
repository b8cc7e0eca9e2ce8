"""Command line: ``magpie-hf push`` and the publishing flags every recipe shares.

Example:
    $ magpie-hf push runs/pro/dataset me/magpie-pro --version 1.0.0
    $ python recipes/magpie_pro.py --preset cpu --push-to-hub me/magpie-pro-demo --version 0.1.0

In a recipe::

    parser = argparse.ArgumentParser()
    add_publish_args(parser)
    args = parser.parse_args()
    validate_publish_args(args)          # fail before hours of generation, not after
    folder = save_dataset_folder(out / "dataset", configs, run_info, license=args.license)
    finish_recipe(args, folder)          # publishes if --push-to-hub, else prints how to push later
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _version(text: str) -> str:
    from .publishing import parse_version

    try:
        return parse_version(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_publish_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--push-to-hub REPO --version X.Y.Z [--private] [--revision BRANCH] [--force] [--license ID]``."""
    group = parser.add_argument_group("publishing to the Hugging Face Hub")
    group.add_argument("--push-to-hub", metavar="REPO", default=None, help="publish the dataset to this Hub dataset repository (user/name)")
    group.add_argument("--version", type=_version, default=None, metavar="X.Y.Z", help="semantic version; the commit is tagged vX.Y.Z (required with --push-to-hub)")
    group.add_argument("--private", action="store_true", help="create the Hub repository private")
    group.add_argument("--revision", default=None, metavar="BRANCH", help="commit to this branch instead of main")
    group.add_argument("--force", action="store_true", help="move an existing version tag instead of refusing")
    group.add_argument("--license", default="other", metavar="ID", help="license of the dataset (Hub license id, default: other)")
    return parser


def validate_publish_args(args: argparse.Namespace) -> None:
    """Exit with a clear message when ``--push-to-hub`` lacks ``--version`` (check right after parsing)."""
    if getattr(args, "push_to_hub", None) and not getattr(args, "version", None):
        raise SystemExit("error: --push-to-hub needs --version X.Y.Z (the tag that pins this version, e.g. --version 1.0.0)")


def finish_recipe(args: argparse.Namespace, folder: str | os.PathLike, *, token: str | None = None):
    """Publish ``folder`` when the recipe got ``--push-to-hub``; otherwise print how to load and push it.

    Returns the :class:`~magpie_hf.hub.PublishResult`, or None when nothing was to be pushed. A refused publish
    (existing tag, auth error) exits with the reason; the folder is always kept.
    """
    from .layout import read_layout
    from .publishing import PublishError, publish, push_later_hint

    folder = Path(folder)
    if getattr(args, "push_to_hub", None):
        validate_publish_args(args)
        try:
            return publish(
                folder,
                args.push_to_hub,
                args.version,
                token=token,
                private=getattr(args, "private", False),
                revision=getattr(args, "revision", None),
                force=getattr(args, "force", False),
            )
        except PublishError as err:
            raise SystemExit(f"error: {err}") from None
    default = read_layout(folder).configs[0]
    version = getattr(args, "version", None) or "v1.0.0"
    print(
        f"Dataset written to {folder}\n"
        f"  load it:  datasets.load_dataset({str(folder)!r}, {default!r})\n"
        f"  push it:  {push_later_hint(folder, 'USER/REPO', version)}"
    )
    return None


def _push(args: argparse.Namespace) -> int:
    from .publishing import HubAuthError, PublishError, publish

    try:
        result = publish(
            args.folder,
            args.repo,
            args.version,
            private=args.private,
            revision=args.revision,
            force=args.force,
            commit_message=args.commit_message,
        )
    except HubAuthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (PublishError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.pushed:
        print(result.message)
        print(f"  load it: datasets.load_dataset({result.repo_id!r}, revision={result.tag!r})")
        return 0
    return 1


def register_cli(subparsers) -> None:
    """Add ``magpie-hf push FOLDER REPO --version X.Y.Z``."""
    parser = subparsers.add_parser(
        "push",
        help="publish a dataset folder to the Hub as one commit tagged vX.Y.Z",
        description="Upload a dataset folder (Parquet per config, dataset card, plots) to a Hub dataset repository in "
        "one commit and tag it vX.Y.Z. The token comes from HF_TOKEN or `hf auth login`; an existing tag is refused "
        "unless --force.",
    )
    parser.add_argument("folder", help="dataset folder written by a recipe (OUTPUT_DIR/dataset)")
    parser.add_argument("repo", help="Hub dataset repository, user/name (created if missing)")
    parser.add_argument("--version", type=_version, required=True, metavar="X.Y.Z", help="semantic version; the tag is vX.Y.Z")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, metavar="BRANCH", help="commit to this branch instead of main")
    parser.add_argument("--force", action="store_true", help="move an existing tag instead of refusing")
    parser.add_argument("--commit-message", default=None, help="default: 'Publish <recipe> vX.Y.Z'")
    parser.set_defaults(func=_push)
