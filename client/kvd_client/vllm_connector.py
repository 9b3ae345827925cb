"""Kept so that configurations naming `kvd_client.vllm_connector` keep working; the connector lives in
`kvd_client.vllm` (see its package docstring). New configurations should name `kvd_client.vllm.connector`."""

from kvd_client.vllm.connector import KvdConnector
from kvd_client.vllm.fingerprint import layout_facts
from kvd_client.vllm.metadata import BlockOp, KvdConnectorMetadata
from kvd_client.vllm.stats import KvdConnectorStats

__all__ = ["BlockOp", "KvdConnector", "KvdConnectorMetadata", "KvdConnectorStats", "layout_facts"]
