"""Deploy the app to a Hugging Face Space: exactly the files the Space runs, in one commit.

    python -m mmft.space OWNER/NAME [--private] [--dry-run] [--variable MMFT_REPO=OWNER/ROUND-REPO ...]

The Space runs `app.py` (README.md's front matter says so) with `requirements.txt`, the `mmft`
package and the bundled demo round with its tiny base models (the fallback when no round is
configured or reachable), and the docs README.md links to. Files the Space does not need (tests,
training, benchmarks) stay home. `.gitattributes` travels too, so the Space's binaries (.safetensors,
.png, tokenizer.json) are LFS. In a git checkout (the project may be a subfolder of one) the Space gets
the last commit, read from git: a file not committed (a scratch module, staged or not) stays home, a
committed file with uncommitted edits, or moved or deleted since, goes as committed (a debug edit never goes
public), and the command names both. Refused: a checkout with nothing committed (not deployed as an empty
Space), a committed symlink, and a checkout where git cannot be run. A file on the Space that is not in
this list is deleted by the same commit. The token is the one huggingface_hub finds (HF_TOKEN, `hf auth login`)
and is never printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mmft.round import path_matches

ROOT = Path(__file__).resolve().parent.parent
SECRET_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY", re.IGNORECASE)
SPACE_PATTERNS = ["README.md", ".gitattributes", "app.py", "requirements.txt", "model_card.md", "mmft/*.py",
                  "demo/base/*/*", "demo/round/config.json", "demo/round/projector.safetensors",
                  "demo/round/adapter/adapter_*",
                  "docs/benchmarks.md", "docs/training.md", "docs/screenshot.png"]  # what README.md links to


def _git(root: Path, *args: str) -> bytes | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _names(out: bytes | None) -> set[str]:
    return {p for p in (out or b"").decode("utf-8", "surrogateescape").split("\0") if p}


class NothingCommitted(RuntimeError):
    """A git checkout whose last commit holds none of the Space's files (or that has no commit yet)."""


def git_state(root: Path) -> tuple[dict[str, str] | None, set[str]]:
    """(the files of the last commit under `root` with their git modes, those of them whose working copy or
    index differs from it), as paths relative to `root` (the project may sit in a subfolder of its
    repository). None outside a checkout: then the patterns alone decide, on the files as they are."""
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != b"true":
        if shutil.which("git") is None and any((d / ".git").exists() for d in (Path(root).resolve(),
                                                                             *Path(root).resolve().parents)):
            raise RuntimeError(f"{root} is a git checkout but git cannot be run: install git, so that only "
                               "committed files go to the Space")
        return None, set()
    tree = _git(root, "ls-tree", "-r", "-z", "HEAD")  # "100644 blob <sha>\t<path>", relative to root
    if tree is None:  # no commit yet
        return {}, set()
    modes = {}
    for entry in tree.split(b"\0"):
        if entry:
            meta, _, name = entry.partition(b"\t")
            modes[name.decode("utf-8", "surrogateescape")] = meta.split()[0].decode()
    return modes, _names(_git(root, "diff", "--relative", "-z", "--name-only", "HEAD"))


def space_files(root: str | Path = ROOT, skipped: list[str] | None = None) -> list[str]:
    """The repo-relative paths the Space needs, sorted (no caches, no tests, no training data). In a git
    checkout, the last commit's files, whether the working copy still has them or not; those the patterns
    match on disk but the last commit lacks go to `skipped`."""
    root = Path(root)
    committed, _ = git_state(root)
    on_disk = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    wanted = lambda paths: {p for p in paths if any(path_matches(p, pat) for pat in SPACE_PATTERNS)  # noqa: E731
                            and "__pycache__" not in p}
    if committed is None:
        return sorted(wanted(on_disk))
    if skipped is not None:
        skipped += sorted(wanted(on_disk) - committed.keys())
    return sorted(wanted(committed))


def edited(root: str | Path, files: list[str]) -> list[str]:
    """Which of `files` have uncommitted edits, or are gone from the working copy: the Space gets their
    committed version."""
    root = Path(root)
    committed, changed = git_state(root)
    if committed is None:
        return []
    return sorted(p for p in files if p in changed or not (root / p).is_file())


def committed_bytes(root: str | Path, files: list[str]) -> dict[str, bytes | Path]:
    """What the Space gets of each file: in a checkout, the committed bytes (`git cat-file --filters`: what
    a checkout writes, LFS smudged, line endings), never the working copy (an edit git is told to ignore,
    `--skip-worktree`, stays home too); elsewhere the file. Refuses an empty list (a checkout with no commit
    would otherwise empty the Space) and a committed symlink or submodule (its bytes are not a file's)."""
    root = Path(root)
    if not files:
        raise NothingCommitted(f"no file of the Space is committed in {root}: commit app.py, mmft/ and demo/ first")
    modes, _ = git_state(root)
    if modes is None:
        return {path: root / path for path in files}
    out: dict[str, bytes | Path] = {}
    for path in files:
        if modes.get(path) not in ("100644", "100755"):
            raise RuntimeError(f"{path} is not a plain file in the last commit (mode {modes.get(path)}: a symlink or "
                               "a submodule): the Space takes plain files only")
        data = _git(root, "cat-file", "--filters", f"HEAD:./{path}")
        if data is None:
            raise RuntimeError(f"cannot read the committed {path} from git")
        out[path] = data
    return out


def check_variables(variables: dict[str, str], root: str | Path = ROOT) -> None:
    """Refuse values app.py refuses at start (the Space would build, then not start): the checkout's own
    `app.py --check` reads them as the Space will, without the deploying machine's MMFT_* settings."""
    if not variables:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFT_", "GRADIO_SERVER_"))}
    done = subprocess.run([sys.executable, str(Path(root) / "app.py"), "--check"], cwd=root, env={**env, **variables},
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        why = re.sub(r"^app\.py: (error: )?", "", lines[-1])
        raise ValueError(f"the Space would not start with these variables: {why}")


def deploy(space_id: str, root: str | Path = ROOT, private: bool = False, variables: dict[str, str] | None = None):
    """Create the Space (Gradio SDK) if needed, make it hold exactly `space_files` (as committed), set its
    variables; (the commit, whether it is a new one)."""
    from huggingface_hub import HfApi

    contents = committed_bytes(root, space_files(root))  # before anything is sent
    with tempfile.TemporaryDirectory() as stage:  # the files as committed, in one folder
        for path, content in contents.items():
            target = Path(stage) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        check_variables(variables or {}, stage)  # the app.py that goes, before anything is sent
        api = HfApi()
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
        before = api.repo_info(space_id, repo_type="space").sha
        info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=stage,
                                 # exact paths: escaped, as the client matches them with fnmatch too
                                 allow_patterns=[glob.escape(p) for p in contents], delete_patterns="*",
                                 commit_message="Deploy the mmft app")
    for key, value in (variables or {}).items():
        api.add_space_variable(space_id, key, value)
    return info, info.oid != before  # the client skips an empty commit and reports the last one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("space_id", help="the Space, OWNER/NAME (created with the Gradio SDK if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; send nothing")
    parser.add_argument("--variable", action="append", default=[], metavar="KEY=VALUE",
                        help="a Space variable to set, e.g. MMFT_REPO=OWNER/NAME (repeatable)")
    args = parser.parse_args(argv)
    from mmft.card import check_repo_id

    try:  # a dry run that passes is a deploy the Hub accepts the name of
        check_repo_id(args.space_id, "the Space id")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    variables = {}
    for item in args.variable:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --variable takes KEY=VALUE, got {key!r} without '='" if not sep else
                  "error: --variable takes KEY=VALUE, got an empty KEY", file=sys.stderr)
            return 2
        if key in variables:
            print(f"error: --variable {key} is given twice", file=sys.stderr)
            return 2
        if SECRET_RE.search(key):  # a Space variable is public: anyone can read it
            print(f"error: --variable {key} looks like a secret, and Space variables are public: set it as a "
                  "Secret in the Space's settings instead", file=sys.stderr)
            return 2
        variables[key] = value
    try:  # a deploy checks them against the app.py it sends (`deploy`); a dry run, against this checkout's
        if args.dry_run:
            check_variables(variables)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped: list[str] = []
    try:  # what goes, read from git: refusals (nothing committed, a symlink, no git) before anything is sent
        files = space_files(skipped=skipped)
        stale = edited(ROOT, files)
        contents = committed_bytes(ROOT, files) if args.dry_run else None
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in skipped:  # a public Space gets committed work only
        print(f"not deployed (not committed): {path}", file=sys.stderr)
    for path in stale:
        print(f"deployed as last committed (its uncommitted edits stay home): {path}", file=sys.stderr)
    if contents is not None:
        for path, content in contents.items():
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            print(f"  {path:<50} {size:>10,} bytes")
        print(f"Dry run, nothing sent: {len(files)} files for the Space {args.space_id}.")
        return 0
    try:
        info, changed = deploy(args.space_id, private=args.private, variables=variables)
    except Exception as err:  # one line, no traceback (and so no token) on the console
        from mmft.hub import error_line

        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    if changed:
        print(f"deployed {len(files)} files: {info.commit_url}")
    else:
        print(f"nothing to deploy: the Space already holds these {len(files)} files ({info.commit_url})"
              + (f"; variables set: {', '.join(variables)}" if variables else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
