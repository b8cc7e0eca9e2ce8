"""``magpie-hf push FOLDER REPO --version X.Y.Z``: publish a dataset folder (:func:`magpie_hf.hub.publish`).

Example:
    $ magpie-hf push runs/pro/dataset me/magpie-pro --version 1.0.0
    $ python recipes/magpie_pro.py --preset cpu --push_to_hub me/magpie-pro-demo --version 0.1.0
"""

from __future__ import annotations

import argparse
import sys


def _version(text: str) -> str:
    from magpie_hf.hub.publishing import parse_version

    try:
        return parse_version(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _push(args: argparse.Namespace) -> int:
    from magpie_hf.hub.publishing import HubAuthError, PublishError, publish

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
