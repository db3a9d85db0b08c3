"""Pretrained folders: a local folder, or a Hugging Face model repo id resolved through its local cache (downloaded
only when asked)."""
from pathlib import Path

from runtime.errors import MissingInput


def pretrained_folder(name_or_path, files=("config.json", "model.safetensors"), download: bool = False,
                      **hub) -> Path:
    """The folder holding `files`: `name_or_path` itself when it is a folder, else that Hugging Face model repo's
    snapshot in the local cache, or, with `download`, fetched by huggingface_hub (`hub`: revision, cache_dir, token,
    force_download). Without `download` the network is never tried (no retries on a machine without it). A repo that
    cannot be had is an InputError naming it and how to download it."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.parent.name and path.parent.is_dir():
        raise MissingInput(f"{name_or_path}: no such folder")  # a local path, not a repo id: no hub round trip
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    name, local_only = str(name_or_path), hub.pop("local_files_only", False) or not download
    try:
        paths = [Path(huggingface_hub.hf_hub_download(name, f, local_files_only=local_only, **hub)) for f in files]
        return paths[0].parent  # one snapshot folder holds them all
    except HFValidationError:
        raise MissingInput(f"{name}: no such folder (nor a Hugging Face repo id)") from None
    except LocalEntryNotFoundError:
        if not local_only:
            raise MissingInput(f"{name}: no such folder, and the Hugging Face model repo {name!r} could not be "
                               f"downloaded (no network?); download it with `hf download {name}` where there is "
                               "network, or give a local folder") from None
        raise MissingInput(f"{name}: no such folder, and {name!r} is not in the local Hugging Face cache "
                           f"({hub.get('cache_dir') or huggingface_hub.constants.HF_HUB_CACHE}); download it with "
                           f"`hf download {name}` where there is network, pass --download (download=True) to fetch "
                           "it now, or give a local folder") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise MissingInput(f"{name}: no such folder, and the Hugging Face model repo {name!r} could not be had "
                           f"({type(e).__name__}); download it with `hf download {name}` (or "
                           f"huggingface_hub.snapshot_download) where there is network, or give a local folder") \
            from None
