"""The knowledge:// resource URIs: the index, a layer, one document; how to make them and how to read them."""

from __future__ import annotations

from collections.abc import Sequence

from sage_server.models import check_id

SCHEME = "knowledge://"
INDEX = f"{SCHEME}index"
LAYER_TEMPLATE = f"{SCHEME}{{layer}}"
DOCUMENT_TEMPLATE = f"{SCHEME}{{layer}}/{{id}}"


def layer_uri(layer: str) -> str:
    """knowledge://{layer}"""
    return f"{SCHEME}{layer}"


def document_uri(layer: str, doc_id: str) -> str:
    """knowledge://{layer}/{id}"""
    return f"{SCHEME}{layer}/{doc_id}"


def is_served(uri: str, layers: Sequence[str]) -> bool:
    """Whether `uri` names a resource SAGE serves, or would serve once its document exists: the index, a configured
    layer, or a well-formed document id in one."""
    if not uri.startswith(SCHEME):
        return False
    rest = uri[len(SCHEME) :]
    if rest == "index" or rest in layers:
        return True
    layer, slash, doc_id = rest.partition("/")
    if not slash or layer not in layers:
        return False
    try:
        check_id(doc_id)
    except ValueError:
        return False
    return True
