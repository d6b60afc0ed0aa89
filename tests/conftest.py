import os

import pytest
import torch

# Tests never reach a model hub, and keep caches out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("HMT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hmt_cache"))
