import hashlib
from pathlib import Path

import numpy as np
import pytest

from routemesh.services.router.config import load_config
from routemesh.services.router.encoders import tokenize

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"


class HashingEncoder:
    """A tiny deterministic dense encoder for fast tests: a normalised bag of hashed
    words, so texts that share words are similar. Counts its calls."""

    name = "test:hashing"
    dim = 64
    batch_hint = None
    parallel_calls = 1

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[int] = []

    def encode(self, texts):
        self.calls.append(len(texts))
        if self.fail:
            raise ConnectionError("encoder is down")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in tokenize(text):
                digest = hashlib.sha256(token.encode()).digest()
                out[row, digest[0] % self.dim] += 1.0
            norm = np.linalg.norm(out[row])
            if norm:
                out[row] /= norm
        return out


CONFIG = """\
version: 1
default_route: lite
margin: 0.05
encoder: {kind: local}
semantic: {dense_weight: 0.8, match_text: last_user, head: none, aggregation: max}
routes:
  - id: lite
    target_model: small-model
    threshold: 0.40
    utterances:
      - what is the capital of france
      - translate hello into spanish
      - tell me a joke about cats
  - id: deep
    target_model: large-model
    threshold: 0.45
    utterances_file: deep.txt
rules:
  - id: tools-go-deep
    route: deep
    when: {has_tools: true}
  - id: sql-keywords
    route: deep
    confidence: 0.8
    when: {keywords: {any: [postgres, mysql], all: [index]}}
  - id: code-fence
    route: deep
    confidence: 0.7
    when: {regex: "```"}
  - id: long-chats
    route: deep
    when: {min_messages: 6}
  - id: pinned-model
    route: lite
    when: {requested_model: cheap-please}
aliases: {auto: null, lite: lite, deep: deep, fast: lite, cheap-please: null}
"""

DEEP = """\
# deep utterances
prove that the square root of two is irrational
design a distributed rate limiter with redis
write a python function to merge sorted lists
"""


@pytest.fixture
def config_path(tmp_path) -> Path:
    (tmp_path / "deep.txt").write_text(DEEP)
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def loaded(config_path):
    return load_config(config_path)


@pytest.fixture
def encoder():
    return HashingEncoder()
