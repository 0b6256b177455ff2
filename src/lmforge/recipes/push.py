"""Export a run and upload it to the Hugging Face Hub (--dry-run: list what would be uploaded).

The export is exactly `lmforge export` (same formats and options, same load-back check, a model
card whose loading snippets name the repo), written to --out (default exports/<repo
name>-<format>) and kept there. Then huggingface_hub creates the repo if needed and uploads the
folder in one commit; the token is huggingface_hub's own (`hf auth login` or HF_TOKEN).
With --dry-run nothing leaves the machine: the files and their sizes are listed instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lmforge.config import ConfigError, UserError
from lmforge.export import ExportConfig, export_run

EXAMPLES = """
lmforge push --run runs/shakespeare --repo me/shakespeare-1m --dry-run
lmforge push --run runs/shakespeare --repo me/shakespeare-1m
lmforge push --run runs/shakespeare --repo me/shakespeare-1m-gguf --format gguf --gguf_type q8_0
"""

HUB = "https://huggingface.co"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass
class Config(ExportConfig):
    """Options of `lmforge push` (the export options, then where to push)."""

    out: str = ""
    """Folder the export is written to (and kept in); empty = exports/<repo name>-<format>."""
    repo: str = ""
    """Hub repository to create or update, as user/name (or org/name)."""
    dry_run: bool = False
    """Write the export and list the files (and sizes) that would be uploaded; upload nothing."""
    private: bool = False
    """Create the repository as private (an existing repository keeps its visibility)."""
    message: str = "Upload model exported by lmforge"
    """Commit message of the upload."""

    def __post_init__(self) -> None:
        if not _REPO.fullmatch(self.repo):
            raise ConfigError(f"repo: {self.repo!r} is not a Hub repository name; use "
                              "--repo user/name")
        if not self.out:
            self.out = f"exports/{self.repo.split('/')[1]}-{self.format}"
        super().__post_init__()
        if self.single_file:
            raise ConfigError(f"out: push uploads a folder (the file and its model card); "
                              f"use e.g. --out {Path(self.out).with_suffix('')}")


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size in bytes) of every file the upload would send."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size)
                  for p in folder.rglob("*") if p.is_file())


def upload(folder: Path, cfg: Config) -> str:
    """Create ``cfg.repo`` if needed and upload ``folder`` in one commit; the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push needs huggingface_hub; pip install huggingface_hub") from None
    api = HfApi()
    try:
        api.create_repo(cfg.repo, private=cfg.private, exist_ok=True)
        commit = api.upload_folder(repo_id=cfg.repo, folder_path=str(folder),
                                   commit_message=cfg.message)
    except Exception as e:  # offline, no token, no permission: one line, the export is kept
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"push to {HUB}/{cfg.repo} failed ({reason}); the export is kept in "
                        f"{folder}: check the network and your token (hf auth login, or "
                        f"HF_TOKEN), then upload it with: hf upload {cfg.repo} {folder}"
                        ) from None
    return str(getattr(commit, "commit_url", f"{HUB}/{cfg.repo}"))


def main(cfg: Config) -> int:
    """Export into --out, list the files, then upload them (unless --dry-run)."""
    console = Console(highlight=False)
    export_run(cfg, console, repo=cfg.repo)
    folder = Path(cfg.out)
    files = list_files(folder)
    total = sum(size for _, size in files)
    verb = "would upload" if cfg.dry_run else "uploading"
    console.print(f"{verb} {len(files)} files ({total:,} bytes) from {folder} to "
                  f"{HUB}/{cfg.repo}:", markup=False, soft_wrap=True)
    for name, size in files:
        console.print(f"  {size:>14,}  {name}", markup=False, soft_wrap=True)
    if cfg.dry_run:
        console.print("dry run: nothing was uploaded", markup=False)
        return 0
    console.print(f"pushed: {upload(folder, cfg)}", markup=False, soft_wrap=True)
    return 0
