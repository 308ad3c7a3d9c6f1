"""The checksum agent block: what the repository writes, what our ModelConfig answers, what Triton checks.

SONIC's comparison of the two blocks against real Triton and our server: test_conformance.py.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import text_format

from serving.predictor import TopTagger
from serving.process import LocalServingError
from serving.triton.checksum import agents_pbtxt, model_checksums
from serving.triton.extensions import as_json, model_config
from serving.triton.process import start_triton
from serving.triton.protos import model_config_pb2
from serving.triton.repository import write_repository


def local_config(repository: Path) -> model_config_pb2.ModelConfig:
    """The repository's config.pbtxt as a SONIC client reads its local copy."""
    text = (repository / "top-tagger" / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(str(model_dir), tmp_path_factory.mktemp("repository"), backend="torch")


@pytest.fixture(scope="module")
def served(model_dir: Path, one_torch_thread: None) -> Iterator[TopTagger]:
    model = TopTagger(str(model_dir), backend="torch")
    assert model.load(), model.not_ready_reason
    yield model
    model.stop()


def test_every_model_file_has_its_md5_under_triton_key_format(model_dir: Path) -> None:
    """Triton's checksum agent: key "<ALGORITHM>:<path relative to the model folder>", value hex MD5."""
    checksums = model_checksums(model_dir)
    files = sorted(path for path in model_dir.rglob("*") if path.is_file())
    assert list(checksums) == [f"MD5:1/tagger/{path.relative_to(model_dir).as_posix()}" for path in files]
    for path in files:
        assert checksums[f"MD5:1/tagger/{path.name}"] == hashlib.md5(path.read_bytes()).hexdigest()


def test_the_repository_config_carries_the_checksums_of_its_model_files(repository: Path, model_dir: Path) -> None:
    (agent,) = local_config(repository).model_repository_agents.agents
    assert agent.name == "checksum"
    assert dict(agent.parameters) == model_checksums(model_dir)
    for key, digest in agent.parameters.items():  # the digests of the copy Triton reads, by the keys' paths
        path = repository / "top-tagger" / key.removeprefix("MD5:")
        assert hashlib.md5(path.read_bytes()).hexdigest() == digest


def test_our_model_config_answers_the_same_block_for_the_folder_it_serves(repository: Path, served: TopTagger) -> None:
    """What SONIC compares: equal blocks for the same files, over gRPC and in Triton's HTTP JSON."""
    ours = model_config(served).model_repository_agents
    assert ours == local_config(repository).model_repository_agents
    assert as_json(model_config(served))["model_repository_agents"] == {
        "agents": [{"name": "checksum", "parameters": model_checksums(served.model_uri)}]
    }


def test_a_changed_model_file_changes_only_its_own_checksum(model_dir: Path, tmp_path: Path) -> None:
    changed = tmp_path / "tagger"
    shutil.copytree(model_dir, changed)
    config = changed / "tagger.json"
    config.write_text(config.read_text() + "\n")
    before, after = model_checksums(model_dir), model_checksums(changed)
    assert [key for key in before if before[key] != after[key]] == ["MD5:1/tagger/tagger.json"]


def test_no_checksums_no_block() -> None:
    assert agents_pbtxt({}) == ""
    quoted = agents_pbtxt({'MD5:1/tagger/a "b".bin': "00"})
    parsed = text_format.Parse(quoted, model_config_pb2.ModelConfig())
    assert dict(parsed.model_repository_agents.agents[0].parameters) == {'MD5:1/tagger/a "b".bin': "00"}


def test_real_triton_refuses_a_model_whose_file_changed_after_the_repository_was_written(
    model_dir: Path, tmp_path: Path
) -> None:
    """The checksum agent built for real tritonserver checks the files before Triton loads them."""
    repository = write_repository(str(model_dir), tmp_path / "repository", backend="torch")
    tampered = repository / "top-tagger" / "1" / "tagger" / "tagger.json"
    tampered.write_text(tampered.read_text() + "\n")
    with pytest.raises(LocalServingError) as caught:
        start_triton(repository, timeout_s=120)
    log = Path(str(caught.value).split("(log ")[1].split(")")[0]).read_text()
    assert "checksum agent: mismatched MD5 for 1/tagger/tagger.json" in log
