"""Fixtures for the metadata tests (helpers live in ``imds_harness``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from imds_harness import Harness, make_config

from edge.config import CredentialsConfig
from edge.view.demo import demo_document


@pytest.fixture
def start(tmp_path: Any) -> Iterator[Callable[..., Harness]]:
    """``start(document=..., on_refresh=..., credentials=..., **metadata_config)`` -> running Harness."""
    harnesses: list[Harness] = []

    def starter(document: dict[str, Any] | None = None, on_refresh: Callable[[Harness], Any] | None = None,
                credentials: CredentialsConfig | None = None, use_demo: bool = True, **metadata: Any) -> Harness:
        config = make_config(tmp_path, credentials, **metadata)
        if document is None and use_demo:
            document = demo_document()
        harness = Harness(config, document, on_refresh)
        harnesses.append(harness)
        return harness

    yield starter
    for harness in harnesses:
        harness.close()


@pytest.fixture
def server(start: Callable[..., Harness]) -> Harness:
    return start()


