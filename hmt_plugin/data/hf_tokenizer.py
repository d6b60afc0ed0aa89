"""A model's own ``tokenizer.json`` as a torchtune tokenizer, with BOS and EOS as the model's
``tokenizer_config.json`` / ``generation_config.json`` define them::

    tokenizer:
      _component_: hmt_plugin.data.hf_tokenizer
      path: ${backbone_dir}          # the checkpoint directory, or its tokenizer.json
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer


class HFTokenizer(HuggingFaceBaseTokenizer):
    """torchtune's :class:`HuggingFaceBaseTokenizer` with BOS/EOS decided the way
    transformers decides them for the same files.

    torchtune's class needs a ``bos_token`` in ``tokenizer_config.json`` (Qwen2 has none) and
    adds BOS to every encoding. Here:

    * BOS is added (``encode(add_bos=True)``) only when the model's tokenizer adds it:
      ``add_bos_token`` in ``tokenizer_config.json`` when it is set, else whether the
      ``tokenizer.json`` post-processor puts BOS in front (Llama 3's template does, GPT-2-style
      tokenizers such as SmolLM2's do not). ``bos_id`` is None when the model has no BOS.
    * EOS is appended on request (documents end with it); ``stop_tokens`` are every id
      ``generation_config.json`` lists as ``eos_token_id`` plus ``eos_id``.
    * Text is encoded without the post-processor, so nothing is added twice.

    Args:
        tokenizer_json_path (str): the ``tokenizer.json`` file.
        tokenizer_config_json_path (Optional[str]): ``tokenizer_config.json`` beside it.
        generation_config_path (Optional[str]): ``generation_config.json`` (or the model's
            ``config.json``, which carries the same ``bos_token_id``/``eos_token_id``).
        max_seq_len (Optional[int]): kept as ``max_seq_len``, as torchtune's tokenizers do.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: Optional[str] = None,
        generation_config_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
    ) -> None:
        super().__init__(
            tokenizer_json_path,
            tokenizer_config_json_path=tokenizer_config_json_path,
            generation_config_path=generation_config_path,
        )
        self.max_seq_len = max_seq_len
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._token_id(self.config, "pad_token")

    # torchtune calls these two from its __init__.
    def _infer_bos_eos_tokens(self) -> None:
        generation = self.generation_config or {}
        self.bos_id = self._token_id(self.config, "bos_token")
        if self.bos_id is None:
            self.bos_id = _first_id(generation.get("bos_token_id"))
        self.eos_id = self._token_id(self.config, "eos_token")
        stops = generation.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        if self.eos_id is None and stops:
            self.eos_id = stops[0]
        if self.eos_id is None:
            raise ValueError(
                "the tokenizer's EOS is named neither in tokenizer_config.json (eos_token) nor in "
                "generation_config.json / config.json (eos_token_id); put the model's "
                "tokenizer_config.json beside its tokenizer.json."
            )
        self.stop_tokens = sorted({self.eos_id, *stops})

    def _infer_should_add_bos_eos(self) -> None:
        flag = (self.config or {}).get("add_bos_token")
        if self.bos_id is None:
            self.adds_bos = False
        elif isinstance(flag, bool):
            self.adds_bos = flag
        else:
            self.adds_bos = self.bos_id in self.tokenizer.encode("", add_special_tokens=True).ids
        # encode() bypasses the post-processor, so torchtune's "HF already added it" flags are off.
        self.hf_adds_bos, self.hf_adds_eos = False, False

    def _token_id(self, config: Optional[Dict[str, Any]], key: str) -> Optional[int]:
        """The id of ``config[key]`` (a token string or ``{"content": ...}``), None if unset."""
        token = (config or {}).get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer_config.json names {key}={token!r}, which tokenizer.json does not "
                "contain; the two files come from different models."
            )
        return token_id

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text``; BOS in front when asked and the model uses one, EOS at the
        end when asked."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.adds_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value:
        return int(value[0])
    return None


def hf_tokenizer(path: Union[str, Path], *, max_seq_len: Optional[int] = None) -> HFTokenizer:
    """:class:`HFTokenizer` from a checkpoint directory or its ``tokenizer.json``, with the
    ``tokenizer_config.json`` and ``generation_config.json`` beside it (``config.json`` when
    there is no generation config).

    Raises:
        FileNotFoundError: no ``tokenizer.json``, or nothing beside it that names BOS/EOS.
    """
    path = Path(path)
    tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"tokenizer.path={str(path)!r}: no tokenizer.json there. Point it at the model's "
            "checkpoint directory or its tokenizer.json."
        )
    directory = tokenizer_json.parent
    tokenizer_config = directory / "tokenizer_config.json"
    generation = next(
        (p for p in (directory / "generation_config.json", directory / "config.json") if p.is_file()),
        None,
    )
    if not tokenizer_config.is_file() and generation is None:
        raise FileNotFoundError(
            f"{directory} has tokenizer.json but no tokenizer_config.json, generation_config.json "
            "or config.json to say which tokens are BOS and EOS; copy them from the model's "
            "download."
        )
    return HFTokenizer(
        str(tokenizer_json),
        tokenizer_config_json_path=str(tokenizer_config) if tokenizer_config.is_file() else None,
        generation_config_path=str(generation) if generation is not None else None,
        max_seq_len=max_seq_len,
    )
