"""Top-N checkpoint averaging (issue 16 item 2): the exact mean, pruning, the teacher rule, resume, and a real stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from models.encoder import CTCLIDModel
from pipeline.config import model_kwargs, supervised_tiny
from pipeline.data.dataset import load_dataset
from pipeline.data.tokenizer import CharTokenizer
from pipeline.engine.average import TopCheckpoints, average_checkpoints, average_state_dicts
from pipeline.engine.decode import decode_dataset
from pipeline.engine.evaluate import score
from pipeline.engine.model import load_trained
from pipeline.engine.trainer import Trainer
from pipeline.layout import RunLayout, StageDir, teachers_for_run
from pipeline.stages.supervised import run_supervised
from storage.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers.dummies import good_row, write_jsonl


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net.train()(torch.randn(8, 3))  # moves the running stats and counts one batch
    with torch.no_grad():  # multiples of 1/64: sums of four are exact in fp32, and so is the division by 4
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.round(t * 64) / 64)
    return net


def test_average_state_dicts_is_the_exact_mean_and_keeps_the_best_ones_integer_buffers():
    nets = [_tiny_net(seed) for seed in range(4)]
    for i, net in enumerate(nets):
        net[1].num_batches_tracked.fill_(10 + i)
    states = [n.state_dict() for n in nets]
    out = average_state_dicts(states)
    assert out.keys() == states[0].keys()
    for key, value in out.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and int(value) == 10  # the first (best) one's, not 11.5
            continue
        expected = sum(s[key].double() for s in states) / 4
        assert value.dtype == torch.float32 and torch.equal(value, expected.float()), key
    assert not torch.equal(out["0.weight"], states[0]["0.weight"])  # a mean, not a copy of the best


def test_average_state_dicts_keeps_half_precision_and_refuses_other_models():
    halves = [{"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16) * k} for k in (1, 2, 3)]
    out = average_state_dicts(halves)["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="other keys"):
        average_state_dicts([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])


def test_top_checkpoints_keep_the_n_lowest_dev_cers():
    top = TopCheckpoints(3)
    dropped = []
    for step, cer in [(1, 50.0), (2, 40.0), (3, 45.0), (4, 30.0), (5, 60.0), (6, 35.0), (7, 30.0)]:
        if top.admits(cer):
            dropped += top.add(step, cer)
    assert top.steps() == [4, 7, 6]  # 30 (earlier first on a tie), 30, 35
    assert dropped == [1, 3, 2]  # 50 when 30 arrived, then 45, then 40; 60 never entered
    assert not top.admits(35.0) and top.admits(34.9)
    assert top.resize(2) == [6] and top.steps() == [4, 7]
    restored = TopCheckpoints(2)
    restored.load_state_dict(json.loads(json.dumps(top.state_dict())))
    assert restored.entries == top.entries
    assert not TopCheckpoints(0).admits(0.0) and not TopCheckpoints(1).admits(0.0)


# --- the Trainer's bookkeeping, with chosen dev CERs --------------------------------------------------------------

def _trainer(stage_dir: Path, average_top_n: int) -> Trainer:
    cfg = supervised_tiny("unused.jsonl", None, average_top_n=average_top_n, device="cpu")
    tokenizer = CharTokenizer(["<blank>", "<unk>", "a", "b", " "])
    kwargs = model_kwargs(cfg.model, tokenizer.vocab_size, 1, cfg.features.n_mels)
    return Trainer(stage="supervised", stage_dir=str(stage_dir), cfg=cfg, model=CTCLIDModel(**kwargs),
                   model_kwargs=kwargs, tokenizer=tokenizer, languages=["es"], dev=None, identity={"train": "x"},
                   meta={"features": cfg.features.model_dump(), "audio": cfg.audio.model_dump()})


def _evaluated(trainer: Trainer, step: int, cer: float) -> None:
    """As if the trainer reached `step` with every weight equal to the step, and dev scored it `cer`."""
    trainer.step = step
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(step)
    trainer.record_dev({"macro": {"n": 1, "cer": cer, "wer": cer, "lid_acc": 100.0}})


def _top_files(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in (stage_dir / "checkpoints/top").glob("*.pt"))


def test_top_files_are_pruned_once_last_pt_forgets_them_and_a_killed_stage_resumes_its_list(tmp_path):
    stage = tmp_path / "supervised"
    trainer = _trainer(stage, 2)
    trainer.restore(resume=False)
    for step, cer in [(2, 50.0), (4, 30.0)]:
        _evaluated(trainer, step, cer)
        trainer.save(trainer.last_url)
    _evaluated(trainer, 6, 40.0)  # pushes out update 2, whose file last.pt still lists
    assert trainer.top.steps() == [4, 6]
    assert _top_files(stage) == ["step00000002.pt", "step00000004.pt", "step00000006.pt"]
    trainer.save(trainer.last_url)
    assert _top_files(stage) == ["step00000004.pt", "step00000006.pt"]
    assert load_checkpoint(str(stage / "checkpoints/best.pt"))["step"] == 4
    _evaluated(trainer, 8, 20.0)  # then killed before the next last.pt

    resumed = _trainer(stage, 2)
    resumed.restore(resume=True)
    assert resumed.step == 6 and resumed.top.entries == [{"step": 4, "metric": 30.0}, {"step": 6, "metric": 40.0}]
    assert _top_files(stage) == ["step00000004.pt", "step00000006.pt"]  # the orphan of update 8 is gone
    member = load_checkpoint(str(stage / "checkpoints/top/step00000006.pt"))
    assert member["step"] == 6 and member["metric"] == 40.0
    assert all(bool((t == 6).all()) for t in member["model"].values() if t.is_floating_point())
    mean = average_checkpoints([str(stage / "checkpoints/top" / name) for name in _top_files(stage)])
    assert all(bool((t == 5).all()) for t in mean.values() if t.is_floating_point())  # (4 + 6) / 2

    _evaluated(resumed, 8, 20.0)
    resumed.save(resumed.last_url)
    assert resumed.top.steps() == [8, 4] and _top_files(stage) == ["step00000004.pt", "step00000008.pt"]

    bigger = _trainer(stage, 3)  # N is no part of the resume key: a resume may change it
    bigger.restore(resume=True)
    assert bigger.top.steps() == [8, 4]
    fresh = _trainer(stage, 2)
    (stage / "checkpoints/averaged.pt").write_bytes(b"stale")
    fresh.restore(resume=False)
    assert _top_files(stage) == [] and not (stage / "checkpoints/averaged.pt").exists()


def test_without_averaging_no_top_files_are_kept(tmp_path):
    stage = tmp_path / "supervised"
    trainer = _trainer(stage, 0)
    trainer.restore(resume=False)
    for step, cer in [(2, 50.0), (4, 30.0)]:
        _evaluated(trainer, step, cer)
        trainer.save(trainer.last_url)
    assert trainer.top.entries == [] and not (stage / "checkpoints/top").exists()
    assert load_checkpoint(trainer.last_url)["top"] == []


# --- the teacher rule -------------------------------------------------------------------------------------------

def _stage_with(stage: StageDir, best_cer: float, averaged_cer: float | None) -> None:
    save_checkpoint(stage.best, {"best": {"metric": best_cer, "step": 10}, "languages": ["es", "sl"]})
    if averaged_cer is not None:
        save_checkpoint(stage.averaged, {"average": {"dev_cer": averaged_cer}})


@pytest.mark.parametrize("averaged_cer, kind", [(11.5, "averaged"), (12.0, "averaged"), (12.5, "best")])
def test_the_averaged_model_teaches_only_when_its_dev_cer_is_not_worse(tmp_path, averaged_cer, kind):
    layout = RunLayout(str(tmp_path))
    _stage_with(layout.supervised, 12.0, None)
    _stage_with(layout.finetune("sl"), 12.0, averaged_cer)
    choice = layout.teacher_choice("sl")
    assert choice.kind == kind and choice.url == getattr(layout.finetune("sl"), kind)
    assert (choice.averaged_cer, choice.best_cer) == (averaged_cer, 12.0)
    other = {"averaged": "best", "best": "averaged"}[kind]
    first, second = (averaged_cer, 12.0) if kind == "averaged" else (12.0, averaged_cer)
    assert choice.note == f"teacher: {kind} (dev CER {first:.2f}) vs {other} ({second:.2f})"
    assert teachers_for_run(str(tmp_path)) == {"es": layout.supervised.best, "sl": choice.url}


def test_without_an_averaged_model_the_teacher_is_best_pt_unread(tmp_path):
    layout = RunLayout(str(tmp_path))
    _stage_with(layout.supervised, 20.0, None)
    Path(layout.slimipl("es").best).parent.mkdir(parents=True)
    Path(layout.slimipl("es").best).write_bytes(b"not read")  # as before: only its existence is checked
    choice = layout.teacher_choice("es")
    assert (choice.url, choice.kind, choice.note) == (layout.slimipl("es").best, "best", "teacher: best")
    assert layout.teacher("sl") == layout.supervised.best


# --- a real stage -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("avg-data")
    texts = ["hola mundo", "buenos dias", "adios", "gracias amigo"]
    train = [good_row(tmp, f"t{i}{'x' * i}", "es", text, 1.5) for i, text in enumerate(texts)]
    dev = [good_row(tmp, f"d{i}{'y' * i}", "es", text, 1.5) for i, text in enumerate(texts[:2])]
    return write_jsonl(tmp / "train.jsonl", train), write_jsonl(tmp / "dev.jsonl", dev)


def _cfg(manifests: tuple[str, str], average_top_n: int):
    return supervised_tiny(*manifests, max_updates=6, eval_every=2, save_every=2, log_every=6, device="cpu",
                           average_top_n=average_top_n,
                           optim={"name": "adamw", "lr": 3e-3, "warmup_updates": 1, "schedule": "constant"})


def test_a_stage_writes_the_mean_of_its_top_checkpoints_and_scores_it_on_dev(manifests, tmp_path):
    plain = run_supervised(_cfg(manifests, 0), str(tmp_path / "plain"))
    result = run_supervised(_cfg(manifests, 2), str(tmp_path / "avg"))
    assert result.losses == plain.losses  # averaging changes no update
    assert "average" not in plain.extra and not (tmp_path / "plain/supervised/checkpoints/averaged.pt").exists()
    assert not (tmp_path / "plain/supervised/checkpoints/top").exists()

    stage = RunLayout(str(tmp_path / "avg")).supervised
    average = result.extra["average"]
    evals = json.loads(Path(stage.file("dev_evals.json")).read_text())
    ranked = sorted((e["metrics"]["macro"]["cer"], e["step"]) for e in evals)
    assert [m["step"] for m in average["members"]] == [step for _, step in ranked[:2]]
    members = [load_checkpoint(stage.top(m["step"]))["model"] for m in average["members"]]
    trained = load_trained(stage.averaged)  # best.pt's format: the usual loader reads it
    for key, value in trained.model.state_dict().items():  # (a + b) / 2 in fp32 is the exact mean rounded once
        assert torch.equal(value, ((members[0][key].double() + members[1][key].double()) / 2).float()), key

    cfg = _cfg(manifests, 2)
    dev = load_dataset(manifests[1], features=cfg.features, policy=cfg.audio, require_text=True, languages=["es"])
    rescored = score(decode_dataset(trained.model, dev, tokenizer=trained.tokenizer, languages=trained.languages,
                                    batch=cfg.batch, bf16=cfg.bf16))
    assert average["dev_cer"] == rescored["macro"]["cer"] == average["dev_metrics"]["macro"]["cer"]
    assert average["best"]["metric"] == result.best["metric"] == ranked[0][0]
    assert re.fullmatch(r"teacher: (averaged|best) \(dev CER \d+\.\d\d\) vs (best|averaged) \(\d+\.\d\d\)",
                        average["note"])
    chosen = RunLayout(str(tmp_path / "avg")).teacher_choice("es")
    assert chosen.kind == average["teacher"] == ("averaged" if average["dev_cer"] <= ranked[0][0] else "best")
    record = json.loads(Path(stage.result).read_text())
    assert record["extra"]["average"]["note"] == average["note"]
    assert stage.averaged in record["cache"]["outputs"]  # deleting averaged.pt retrains the stage
    assert average["note"] in Path(stage.file("dev_metrics.md")).read_text()
