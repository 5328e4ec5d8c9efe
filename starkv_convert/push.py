"""Publishing a converted checkpoint to the Hugging Face Hub, only if it passed validation."""

import json
from pathlib import Path

from .errors import StarKVError

REPORT = "starkv_report.json"


def read_report(folder: Path) -> dict:
    """The checkpoint's starkv_report.json; raises StarKVError if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / REPORT).read_text())
    except (OSError, ValueError):
        raise StarKVError(f"{folder} has no readable {REPORT}: push only folders written by starkv-convert") from None


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Creates `repo_id` (if needed) and uploads `folder`; returns the repository URL."""
    from huggingface_hub import HfApi

    report = read_report(folder)
    if not report.get("validation", {}).get("passed"):
        problems = "; ".join(report.get("validation", {}).get("problems", [])) or "no validation recorded"
        raise StarKVError(f"refusing to push {folder}: it failed validation ({problems})")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ratio = report["budget"]["kept_ratio"]
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload STAR-KV checkpoint ({ratio:.0%} of the KV cache kept)",
        )
    except Exception as e:  # auth, network and permission errors from the Hub
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StarKVError(f"push to {repo_id} failed: {first} (log in with `hf auth login` or set HF_TOKEN)") from None
    return str(url)
