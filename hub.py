"""Pretrained folders: a local folder, or a Hugging Face model repo id resolved through its local cache."""
from pathlib import Path

from errors import MissingInput


def pretrained_folder(name_or_path, files=("config.json", "model.safetensors"), **hub) -> Path:
    """The folder holding `files`: `name_or_path` itself when it is a folder, else that Hugging Face model repo's
    snapshot (downloaded by huggingface_hub, or from its cache; `hub`: revision, cache_dir, local_files_only, token,
    force_download). A repo that cannot be had is an InputError naming it and how to download it."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.parent.name and path.parent.is_dir():
        raise MissingInput(f"{name_or_path}: no such folder")  # a local path, not a repo id: no hub round trip
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    name = str(name_or_path)
    try:
        paths = [Path(hf_hub_download(name, f, **hub)) for f in files]  # one snapshot folder holds them all
        return paths[0].parent
    except HFValidationError:
        raise MissingInput(f"{name}: no such folder (nor a Hugging Face repo id)") from None
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise MissingInput(f"{name}: no such folder, and the Hugging Face model repo {name!r} could not be had "
                           f"({type(e).__name__}); download it with `hf download {name}` (or "
                           f"huggingface_hub.snapshot_download) where there is network, or give a local folder") \
            from None
