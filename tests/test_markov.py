"""``--data markov:...``: a seeded Markov chain whose entropy rate (the best possible loss) is
computed exactly. Checked against an independent computation (dense transition matrix,
stationary distribution from an eigenvector), against the oracle's loss on samples, and through
the trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from smallbatch_rs import cli
from smallbatch_rs.train import TrainConfig, train
from smallbatch_rs.train.data import load_data
from smallbatch_rs.train.markov import MarkovChain, MarkovSpec


def test_specs_parse_with_defaults_suffixes_and_named_errors():
    assert MarkovSpec.parse("markov:") == MarkovSpec()
    spec = MarkovSpec.parse("markov:vocab=300, branch=7,zipf=0.8,seed=3,tokens=2M")
    assert spec == MarkovSpec(vocab=300, branch=7, zipf=0.8, seed=3, tokens=2_000_000)
    for source, message in [
        ("markov:size=3", "unknown setting 'size=3' (settings: vocab, branch, zipf, seed, tokens, as key=value)"),
        ("markov:vocab", "unknown setting 'vocab' (settings: vocab, branch, zipf, seed, tokens, as key=value)"),
        ("markov:vocab=many", "vocab must be a number, got 'many'"),
        ("markov:vocab=2.5", "vocab must be a number, got '2.5'"),
        ("markov:vocab=1", "vocab must be in [2, 65536], got 1"),
        ("markov:vocab=10,branch=11", "branch must be in [1, vocab], got 11"),
        ("markov:zipf=-1", "zipf must be finite and >= 0, got -1.0"),
    ]:
        with pytest.raises(ValueError) as e:
            MarkovSpec.parse(source)
        assert str(e.value) == f"--data {source!r}: {message}"


def _dense(chain: MarkovChain) -> np.ndarray:
    v = chain.spec.vocab
    p = np.zeros((v, v))
    for i in range(v):
        p[i, chain.successors[i]] = chain.probs[i]
    return p


@pytest.mark.parametrize("spec", [MarkovSpec(vocab=5, branch=3, zipf=1.0, seed=1), MarkovSpec(vocab=40, branch=6, zipf=2.0, seed=2)])
def test_the_entropy_rate_equals_an_independent_computation(spec):
    chain = MarkovChain(spec)
    p = _dense(chain)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-15)
    # Stationary distribution: the left eigenvector of eigenvalue 1.
    values, vectors = np.linalg.eig(p.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    pi /= pi.sum()
    assert np.abs(pi - chain.stationary).max() < 1e-12
    rows = [-sum(x * math.log(x) for x in row if x > 0) for row in p]
    assert chain.entropy_rate == pytest.approx(float(np.dot(pi, rows)), rel=1e-12)
    # Successors are distinct, most likely first.
    assert all(len(set(s)) == spec.branch for s in chain.successors)
    assert np.all(np.diff(chain.probs, axis=1) <= 0)


def test_the_oracle_loss_of_samples_is_the_entropy_rate_within_sampling_error():
    chain = MarkovChain(MarkovSpec(vocab=256, branch=16, seed=4))
    tokens = chain.sample(2000, 101, np.random.default_rng(0))
    prev, nxt = tokens[:, :-1].ravel(), tokens[:, 1:].ravel()
    match = chain.successors[prev] == nxt[:, None]
    assert match.sum(axis=1).tolist() == [1] * len(prev), "every transition is to a listed successor"
    losses = -np.log(chain.probs[prev][match])
    stderr = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean() - chain.entropy_rate) < 4 * stderr
    # Sequences start from pi (L1 distance of 40000 draws: about 0.065 expected).
    first = chain.sample(40000, 1, np.random.default_rng(1))[:, 0]
    assert np.abs(np.bincount(first, minlength=256) / len(first) - chain.stationary).sum() < 0.12


def test_load_data_reads_a_markov_stream_with_its_floor(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLBATCH_CACHE", str(tmp_path))
    chunks, tok = load_data("markov:vocab=100,branch=8,tokens=20k", 100, 32, 640, seed=0)
    again, _ = load_data("markov:vocab=100,branch=8,tokens=20k", 100, 32, 640, seed=0)
    assert tok.get_vocab_size() == 100
    assert chunks.floor == pytest.approx(MarkovChain(MarkovSpec(vocab=100, branch=8)).entropy_rate, rel=1e-15)
    assert chunks.train_tokens + len(chunks.val_chunks) * 32 >= 19_000
    x, y = chunks.train_batch(3, 4)
    assert x.shape == (4, 32) and int(x.max()) < 100 and (x[:, 1:] == y[:, :-1]).all()
    assert (chunks.batch(chunks.val_chunks[:3])[0] == again.batch(again.val_chunks[:3])[0]).all()
    other, _ = load_data("markov:vocab=100,branch=8,tokens=20k,seed=1", 100, 32, 640, seed=0)
    assert not (chunks.batch([0])[0] == other.batch([0])[0]).all()


def test_training_on_markov_data_reports_the_floor(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLBATCH_CACHE", str(tmp_path / "cache"))
    summary = train(TrainConfig(preset="tiny", seq_len=32, data="markov:vocab=64,branch=4,tokens=40k", tokens=32 * 40,
                                val_tokens=1024, progress=False, compile=False, out=str(tmp_path / "run")))
    floor = MarkovChain(MarkovSpec(vocab=64, branch=4)).entropy_rate
    assert summary["floor"] == pytest.approx(floor) and summary["model"]["vocab_size"] == 64
    assert summary["final_val_loss"] > floor - 0.05
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["floor"] == summary["floor"]


def test_a_bad_markov_source_exits_2_with_one_line(capsys, tmp_path):
    assert cli.main(["train", "--data", "markov:vocab=1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--data 'markov:vocab=1': vocab must be in [2, 65536], got 1") and len(err.splitlines()) == 1
