"""vLLM's hidden-states connector made to run on the CPU build (loaded by vLLM, never imported by draftcache).

vLLM's ``extract_hidden_states`` speculative method stores the captured hidden states of every
prompt token in a cache-only KV layer; ``ExampleHiddenStatesConnector`` copies them out when the
request finishes and writes ``{req_id}.safetensors`` (``hidden_states [n_tokens, n_ids, H]``,
``token_ids [n_tokens]``). On the CPU build its copy step crashes the worker twice (vLLM 0.32):

* ``torch.empty_like(..., device="cpu", pin_memory=True)``: "pin_memory=True requires a CUDA or
  other accelerator backend";
* the copy-done marker is a ``torch.cuda.Event`` (a placeholder without ``query()`` on CPU), which
  ``get_finished`` polls.

:class:`DraftcacheHiddenStatesConnector` overrides only that step: on the CPU the hidden states
already live in host memory, so it copies them into an ordinary tensor and records the copy as
done at once; the disk write, its lock file and everything else stay vLLM's. On a CUDA device it
defers to the stock implementation. vLLM imports this module in its worker through
``kv_transfer_config["kv_connector_module_path"]``, so importing it needs vLLM.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

__all__ = ["DraftcacheHiddenStatesConnector", "CONNECTOR_MODULE", "CONNECTOR_NAME"]

CONNECTOR_MODULE = __name__
CONNECTOR_NAME = "DraftcacheHiddenStatesConnector"


class _CopyDone:
    """Stands for the stock connector's copy-done CUDA event: a host copy is complete when made."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class DraftcacheHiddenStatesConnector(ExampleHiddenStatesConnector):
    """``ExampleHiddenStatesConnector`` whose KV-cache-to-host copy works without CUDA."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is not None and self._kv_cache.device.type != "cpu":
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)              # [n_blocks]
        offsets = torch.arange(self._block_size, dtype=torch.long)                  # [block_size]
        slot_mapping = (offsets[None, :] + block_ids[:, None] * self._block_size).flatten()
        num_tokens = pending.token_ids.shape[0]
        # advanced indexing already copies; clone() makes it an ordinary, unpinned host tensor
        hidden_states = extract_from_kv_cache(self._kv_cache, slot_mapping, num_tokens).clone()
        tensors = {"hidden_states": hidden_states, "token_ids": pending.token_ids.clone()}

        assert self._req_futures.get(pending.req_id) is None, "Found another KV transfer request with same req_id!"
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _CopyDone()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
