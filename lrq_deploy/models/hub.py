"""Hugging Face model ids (`ORG/NAME`, `ORG/NAME@REVISION`): resolved to a local snapshot through
huggingface_hub, which keeps its cache and honours HF_HUB_OFFLINE / HF_HUB_CACHE. Only files lrq
reads are fetched: configs, tokenizer files, safetensors weights and (run only with
--trust-remote-code) Python modules; pickled weights are never downloaded."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lrq_deploy.errors import LrqError

# configs, tokenizers (json / sentencepiece / tiktoken / vocab + merges), chat templates, weights, remote code
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(spec: str) -> bool:
    """`ORG/NAME[@REVISION]` that is not a local path (a local directory always wins)."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists() and not spec.startswith(".")


def with_revision(spec: str, revision: str | None) -> str:
    """The spec naming `revision` of a hub id (`--revision`); a local path takes none."""
    if revision is None:
        return spec
    if not is_hub_id(spec):
        raise LrqError(f"--revision applies to Hugging Face model ids (ORG/NAME); {spec} is not one")
    if "@" in spec:
        raise LrqError(f"{spec} names a revision already; give it once (ORG/NAME@REV or --revision REV)")
    return f"{spec}@{revision}"


def hub_snapshot(spec: str) -> Path:
    """The local snapshot directory of a hub id, downloaded into the cache when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    match = _HUB_ID.match(spec)
    repo, revision = match["repo"], match["revision"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise LrqError(f"model {spec} is not in the Hugging Face cache and {where}; download it once online "
                       f"(lrq calibrate {spec} ... or huggingface-cli download {repo}), or give a local directory") from None
    except RevisionNotFoundError:
        raise LrqError(f"model {repo} has no revision {revision!r} on the Hugging Face Hub") from None
    except GatedRepoError:
        raise LrqError(f"model {repo} is gated: accept its terms on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise LrqError(f"model path {spec} does not exist, and no Hugging Face model {repo} is visible "
                       "(a private model needs hf auth login)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise LrqError(f"cannot fetch {spec} from the Hugging Face Hub ({str(exc).strip().splitlines()[0]})") from None
