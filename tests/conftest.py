import os

import pytest
import torch

# Tests never reach a model hub, and keep caches out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_threads_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    # Tiny models: one intra-op thread is faster than two fighting over the ops, and child
    # processes (torchrun ranks) do the same through OMP_NUM_THREADS.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HMT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hmt_cache"))
    yield
    torch.set_num_threads(threads)
