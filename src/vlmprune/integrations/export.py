"""``vlmprune prune --format compressed-tensors``: where export for sparse serving stands.

compressed-tensors stored 2:4 and unstructured sparse weights compactly (its ``sparse-24-bitmask`` and
``sparse-bitmask`` compressors) up to release 0.14, which requires transformers < 5. The releases that
run with transformers 5 (0.15 on, 0.20 here) removed those compressors and keep only the sparsity
config classes; their loader refuses Sparse24 models, and vLLM dropped the 2:4 sparse kernels too. So
there is no sparse compressed-tensors format that this stack can write and read back, and this
refuses in one line, before any pruning, rather than write a directory nothing loads. The default
output (a ``save_pretrained`` directory with the zeros in dense weights) is what vLLM serves, densely.
Token pruning is never part of an export: it lives in vlmprune's hooks, not in the weights.
"""
from __future__ import annotations

from importlib import metadata

from ..errors import VlmpruneError

FORMATS = ("save_pretrained", "compressed-tensors")


def check_format(name: str) -> None:
    """Raise :class:`VlmpruneError` unless ``name`` is a format this installation can write."""
    if name == "save_pretrained":
        return
    try:
        version = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        raise VlmpruneError("--format compressed-tensors needs the compressed-tensors package: "
                            "pip install 'vlmprune[export]'") from None
    raise VlmpruneError(f"--format compressed-tensors: compressed-tensors {version} has no sparse format (its 2:4 "
                        "and bitmask compressors ended with 0.14, which needs transformers<5); drop --format to "
                        "save a save_pretrained directory, which vLLM serves as a dense model")
