"""Evaluation (dartprune eval, its tasks, the data loaders and the lm-eval backend) on a tiny random Llama with a
tiny BPE tokenizer trained here, on the synthetic data folder tests/data/mini; the mapping of the real sets is
checked when the real data is present."""
from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dartprune import DartConfig, attach
from dartprune.cli.main import main as cli_main
from dartprune.evaluation import EvalSettings, run_evaluation
from dartprune.evaluation.core import (
    MethodSpec, Session, encode_pair, method_specs, needs_bos_every_window,
    teacher_forced_logprobs,
)
from dartprune.provenance import versions
from dartprune.data import DataNotFoundError, MCItem, load_mc, load_summaries, load_text, mc_items
from dartprune.evaluation.mc import score_item
from dartprune.evaluation.conversation import dialogues
from dartprune.evaluation.generation import repetition, rouge_vs_dense
from dartprune.evaluation.drift import Drift, at_executed_sparsity, drift_sequences, read_details
from dartprune.evaluation.intervals import bootstrap, gap_recovered, ratio_of_geomeans
from dartprune.evaluation.ppl import Perplexity
from tests.conftest import MINI
from tests.helpers import dense_reference_logprobs
from tests.tiny_models import FAMILIES, VOCAB, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECORDED = ("task", "subtask", "model", "dtype", "method", "sparsity", "metrics", "items", "prefix_length",
            "protocol", "versions", "config", "engine", "seconds", "seed")



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 decoding of a tiny model is far faster on one thread (and the machine has two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, folder): a tiny random Llama saved with its tokenizer, loadable by name."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    assert len(tokenizer) == VOCAB and tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 0
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def spec(method: str, sparsity: float = 0.5, **extra) -> MethodSpec:
    return MethodSpec(method, sparsity, DartConfig(method=method, sparsity=sparsity, **extra))


def check_recorded(result: dict) -> None:
    for key in RECORDED:
        assert key in result, key
    for package in ("torch", "transformers", "dartprune"):
        assert result["versions"][package]
    assert result["items"] >= 1 and result["protocol"]


# ----------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("loop", ["native", "hf"])
def test_teacher_forced_dense_equals_plain_forward(tiny, loop):
    model, tokenizer, _ = tiny
    ids = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(0))
    for traced, chunk in ((20, 5), (1, 3), (0, 5)):
        with Session(model, tokenizer, DartConfig(method="dense"), loop) as session:
            scored = session.score(ids, traced, chunk)
        reference = dense_reference_logprobs(model, ids, traced)
        assert scored.logprobs.shape == (70 - traced - 1,)
        assert torch.allclose(scored.logprobs, reference, atol=1e-4, rtol=0)


def test_teacher_forced_prunes_every_scored_token_in_both_loops_alike(tiny):
    """Under a pruned method the first scored token already differs from dense: it comes from a pruned forward;
    the native loop and Hugging Face with the engine attached score alike."""
    model, tokenizer, _ = tiny
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    scored = {}
    for loop in ("native", "hf"):
        with Session(model, tokenizer, DartConfig(method="dart", sparsity=0.7, window=3), loop) as session:
            scored[loop] = session.score(ids, 20, 3)
            stats = session.stats()[0]
        assert stats.prompt_tokens == 20 and stats.tokens == 39
    dense = dense_reference_logprobs(model, ids, 20)
    assert not torch.isclose(scored["native"].logprobs[0], dense[0], atol=1e-4)
    assert torch.allclose(scored["native"].logprobs, scored["hf"].logprobs, atol=1e-4)
    with attach(model, DartConfig(method="dart", sparsity=0.7, window=3)):
        direct = teacher_forced_logprobs(model, ids, 20, 3)
    assert torch.allclose(direct.logprobs, scored["hf"].logprobs, atol=1e-6)


def test_method_specs_dense_once_and_unknown_method():
    specs = method_specs(["dense", "dart", "griffin"], [0.5, 0.7])
    assert [s.label for s in specs] == ["dense", "dart@0.5", "dart@0.7", "griffin@0.5", "griffin@0.7"]
    with pytest.raises(ValueError, match="unknown method"):
        method_specs(["nope"], [0.5])
    with pytest.raises(ValueError, match="unknown DartConfig key"):
        method_specs(["dart"], [0.5], {"windw": 3})


def test_method_variants_carry_their_own_settings():
    specs = method_specs(["dart", "dart[detector=paper;window=5]"], [0.5], {"window": 16})
    assert [s.label for s in specs] == ["dense", "dart@0.5", "dart[detector=paper;window=5]@0.5"]
    assert (specs[1].config.window, specs[2].config.window, specs[2].config.detector) == (16, 5, "paper")
    one_layer = method_specs(["dart[monitored_layers=-1]"], [0.5], include_dense=False)[0]
    assert one_layer.config.monitored_layers == (-1,)
    for bad, match in (("dart[]", "variant looks like"), ("dart[window=5", "variant looks like"),
                       ("dart[sparsity=0.3]", "cannot set sparsity"), ("dart[windw=3]", "unknown DartConfig key")):
        with pytest.raises(ValueError, match=match):
            method_specs([bad], [0.5])
    with pytest.raises(ValueError, match="listed twice"):
        method_specs(["dart", "dart"], [0.5])


# ----------------------------------------------------------------------------------------------- ppl and drift
def test_a_ppl_window_too_short_for_the_prefix_names_both_options_and_their_defaults(tiny):
    model, tokenizer, _ = tiny
    settings = EvalSettings(model="tiny", limit=2, ppl_window=128, data_dir=str(MINI))    # --prefix left at 128
    defaults = EvalSettings()
    with pytest.raises(ValueError, match=rf"--prefix \(128\) must be >= 1 and leave >= 2 tokens in the window "
                                         rf"\(--ppl-window 128\).*the defaults are {defaults.ppl_window} and "
                                         rf"{defaults.prefix}\)"):
        Perplexity(settings, model, tokenizer, versions()).prepare()


def test_ppl_dense_matches_direct_computation(tiny):
    model, tokenizer, _ = tiny
    settings = EvalSettings(model="tiny", limit=2, prefix=16, ppl_window=64, data_dir=str(MINI))
    task = Perplexity(settings, model, tokenizer, versions())
    task.prepare()
    assert len(task.windows) == 2 and all(len(w) == 64 for w in task.windows)
    with Session(model, tokenizer, DartConfig(method="dense")) as session:
        [result] = task.evaluate(spec("dense", 0.0), session)
    nll = torch.cat([-dense_reference_logprobs(model, w, 16) for w in task.windows])
    assert result.metrics["scored_tokens"] == nll.numel() == 2 * (64 - 17)
    assert math.log(result.metrics["ppl"]) == pytest.approx(float(nll.mean()), abs=1e-4)
    check_recorded(result.to_dict())
    assert result.prefix_length == 16 and result.method == "dense"


MINI_GENRES = {"story": ["gutenberg:harbour"], "recipe": ["gutenberg:kitchen"], "science": ["gutenberg:orbits"],
               "code": ["python:argparse"]}


def test_drift_sequences_pair_every_genre_and_never_reuse_text(tiny):
    _, tokenizer, _ = tiny
    sequences = drift_sequences(tokenizer, prefix=16, segment=12, genres=MINI_GENRES, root=MINI, bos=1)
    switches = [q for q in sequences if q.kind == "switch"]
    controls = [q for q in sequences if q.kind == "control"]
    assert len(switches) == 4 * 3 and len(controls) == 4 * 3
    assert {(q.genre_a, q.genre_b) for q in switches} == {(a, b) for a in MINI_GENRES for b in MINI_GENRES if a != b}
    assert all(len(q.ids) == 16 + 24 and q.switch == 28 and q.ids[0] == 1 for q in sequences)
    assert [q.split for q in switches[:4]] == ["tune", "test", "tune", "test"]
    assert len({q.name for q in sequences}) == len(sequences)      # names key the traces and the details
    # segments of one source are consecutive and never handed out twice
    pieces = [tuple(q.ids[1:28]) for q in sequences if q.genre_a == "recipe"]
    assert len(set(pieces)) == len(pieces)


def test_static_at_an_executed_sparsity_interpolates_between_the_bracketing_runs():
    curve = {0.3: {"executed_sparsity": 0.24, "nll_after": 3.0}, 0.5: {"executed_sparsity": 0.40, "nll_after": 4.0},
             0.4: {"executed_sparsity": 0.32, "nll_after": 3.2}}
    assert at_executed_sparsity(curve, 0.28, "nll_after") == pytest.approx(3.1)
    assert at_executed_sparsity(curve, 0.36, "nll_after") == pytest.approx(3.6)
    assert at_executed_sparsity(curve, 0.40, "nll_after") == pytest.approx(4.0)
    with pytest.raises(ValueError, match="outside the runs given"):
        at_executed_sparsity(curve, 0.2, "nll_after")
    assert at_executed_sparsity({0.5: curve[0.5]}, 0.40, "nll_after") == 4.0          # one run, on its point
    twice = {**curve, 0.51: {"executed_sparsity": 0.40, "nll_after": 5.0}}
    assert at_executed_sparsity(twice, 0.40, "nll_after") == pytest.approx(4.5)      # two runs at one point


def test_drift_details_of_several_runs_pair_by_sequence(tmp_path):
    def write(path, rows):
        path.write_text("".join(json.dumps({"task": "drift", **r}) + "\n" for r in rows))

    dense = [{"method": "dense", "sparsity": 0.0, "name": "a", "nll_after": 1.0},
             {"method": "dense", "sparsity": 0.0, "name": "c (control)", "nll_after": 1.5},
             {"method": "dense", "sparsity": 0.0, "name": "c (control)", "nll_after": 1.6}]
    write(tmp_path / "one.jsonl", dense + [{"method": "static", "sparsity": 0.5, "name": "a", "nll_after": 2.0}])
    write(tmp_path / "two.jsonl", dense + [{"method": "static", "sparsity": 0.3, "name": "a", "nll_after": 1.8}])
    records = read_details([tmp_path / "one.jsonl", tmp_path / "two.jsonl"], {"dense", "static"})
    assert sorted(records) == [("dense", 0.0), ("static", 0.3), ("static", 0.5)]
    assert [r["nll_after"] for r in records[("dense", 0.0)].values()] == [1.0, 1.5, 1.6]
    assert records[("dense", 0.0)][("c (control)", 1)]["nll_after"] == 1.6      # the n-th of a name
    assert list(read_details([tmp_path / "one.jsonl"], {"static"})) == [("static", 0.5)]
    write(tmp_path / "later.jsonl", [{**dense[0], "work_sparsity": 0.0}] + dense[1:])    # a field added since
    assert read_details([tmp_path / "one.jsonl", tmp_path / "later.jsonl"], {"dense"})[("dense", 0.0)] == \
        records[("dense", 0.0)]
    write(tmp_path / "three.jsonl", [{**dense[0], "nll_after": 1.1}] + dense[1:])
    with pytest.raises(ValueError, match="dense at sparsity 0 is in two of the files given with different"):
        read_details([tmp_path / "one.jsonl", tmp_path / "three.jsonl"], {"dense"})


def test_drift_metrics_count_false_retraces_and_detection_exactly():
    records = [
        {"kind": "switch", "nll_before": 1.0, "nll_after": 2.0, "nll_after_64": 2.5, "nll_all": 1.5,
         "scored_before": 100, "scored_all": 200, "false_retraces": 1, "first_after": 30, "executed_sparsity": 0.4},
        {"kind": "switch", "nll_before": 3.0, "nll_after": 4.0, "nll_after_64": 4.5, "nll_all": 3.5,
         "scored_before": 100, "scored_all": 200, "false_retraces": 0, "first_after": 90, "executed_sparsity": 0.4},
        {"kind": "control", "nll_before": 1.0, "nll_after": 1.0, "nll_after_64": 1.0, "nll_all": 1.0,
         "scored_before": 100, "scored_all": 500, "false_retraces": 2, "first_after": None, "executed_sparsity": 0.5},
    ]
    m = Drift.metrics(records)
    assert m["ppl_before"] == pytest.approx(math.exp(2.0)) and m["ppl_after"] == pytest.approx(math.exp(3.0))
    assert m["ppl_control"] == pytest.approx(math.e) and m["false_per_1k_control"] == pytest.approx(4.0)
    assert m["false_per_1k_before"] == pytest.approx(5.0)
    assert m["detected_64"] == 0.5 and m["median_delay"] == 60
    assert (m["switches"], m["controls"]) == (2, 1)


def test_repetition_measures_loops():
    assert repetition("the steam engine was built in a mill near the river") == 0.0
    assert repetition("by the invention " * 10) == pytest.approx(1 - 3 / 27)
    assert repetition("too short") == 0.0


def test_an_output_equal_to_denses_scores_one_against_it_even_when_both_are_empty():
    """ROUGE scores two empty texts 0; an output the same as dense's is full agreement (it had scored 0)."""
    assert rouge_vs_dense("", "") == 1.0 and rouge_vs_dense("the ship sailed", "the ship sailed") == 1.0
    assert rouge_vs_dense("", "the ship sailed") == 0.0
    assert rouge_vs_dense("the ship sank", "the ship sailed") == pytest.approx(2 / 3)


def test_paired_bootstrap_of_geometric_mean_ratios():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5]
    estimate, low, high = bootstrap([a, b], ratio_of_geomeans, samples=500)
    assert estimate == pytest.approx(math.exp(-0.5)) and low == pytest.approx(high) == pytest.approx(estimate)
    estimate, low, high = bootstrap([a, a[::-1]], ratio_of_geomeans, samples=500)
    assert estimate == pytest.approx(1.0) and low < 1.0 < high
    recovered = bootstrap([[2.0, 2.2], [3.0, 3.0], [1.0, 1.0]], gap_recovered, samples=200)
    assert recovered[0] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        bootstrap([a, b[:2]], ratio_of_geomeans)


def test_drift_task_scores_switches_and_controls_and_compares_methods(tiny, tmp_path):
    model, tokenizer, _ = tiny
    settings = EvalSettings(model="tiny", methods=["dart", "static", "dart[detector=none]"], sparsities=[0.5],
                            tasks=["drift"],
                            out=str(tmp_path / "drift"), data_dir=str(MINI), prefix=16, drift_profile="quick",
                            drift_sources=MINI_GENRES, drift_split="test", extra={"detector": "paper", "window": 5,
                                                                                  "monitored_layers": (-1,), "trigger_count": 1, "floor": 0.0, "delta": 0.0, "cooldown": 0})
    results, out = run_evaluation(settings, model, tokenizer, command="test", echo=False)
    by = {r.method: r for r in results}
    assert set(by) == {"dense", "dart", "static", "dart[detector=none]"} and by["dense"].items == 6 + 6
    assert by["dart[detector=none]"].metrics["false_per_1k_control"] == 0
    assert by["dense"].metrics["false_per_1k_control"] == 0 and by["static"].metrics["detected_64"] == 0
    assert by["dart"].metrics["false_per_1k_control"] > 0          # a hair-trigger monitor fires everywhere
    assert by["dart"].metrics["executed_sparsity"] == pytest.approx(by["static"].metrics["executed_sparsity"])
    saved = json.loads((out / "results.json").read_text())
    parts = {c["part"] for c in saved["comparisons"] if c["method"] == "dart@0.5"}
    assert parts == {"after switch", "before switch", "controls"}
    first = saved["comparisons"][0]
    assert first["ppl_ratio_vs_static"][1] <= first["ppl_ratio_vs_static"][0] <= first["ppl_ratio_vs_static"][2]
    assert "## Paired comparisons" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------------------------- conversation
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
MINI_THREE = {g: MINI_GENRES[g] for g in ("story", "recipe", "code")}


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain"])
def test_conversation_dialogues_change_genre_at_every_turn(template):
    tokenizer = chat_tokenizer() if template else tiny_tokenizer()
    items = dialogues(tokenizer, passage=16, reply=12, genres=MINI_THREE, root=MINI, bos=not template)
    assert len(items) == 6 and [d.split for d in items] == ["tune", "test"] * 3
    assert {d.genres for d in items} == set(itertools.permutations(MINI_THREE, 3))
    for d in items:
        assert [is_reply for _, is_reply in d.parts] == [False, True] * 3
        text = tokenizer.decode([t for tokens, _ in d.parts for t in tokens])
        assert text.count("Continue this text:") == 3
        assert d.parts[0][0][0] == 1 if not template else text.startswith("<s>user:")
    replies = [tokenizer.decode(d.parts[1][0]) for d in items]
    assert len(set(replies)) == len(replies)                               # no text is used twice


@pytest.mark.parametrize("loop", ["native", "hf"])
def test_score_turns_dense_equals_one_plain_forward(tiny, loop):
    """Dense, a conversation scored turn by turn through the cache gives the log-probabilities of one forward over
    the whole dialogue at the reply tokens."""
    model, _, _ = tiny
    d = dialogues(chat_tokenizer(), 16, 12, MINI_THREE, MINI)[0]
    ids = [t for tokens, _ in d.parts for t in tokens]
    with Session(model, tiny_tokenizer(), DartConfig(method="dense", sparsity=0.0), loop=loop) as session:
        replies = session.score_turns(d.parts, chunk=5)
    logp = model(torch.tensor([ids]), use_cache=False).logits[0].log_softmax(-1)
    offset, expected = 0, []
    for tokens, is_reply in d.parts:
        if is_reply:
            expected.append(logp[offset - 1:offset + len(tokens) - 1].gather(1, torch.tensor(tokens)[:, None])[:, 0])
        offset += len(tokens)
    assert [len(r) for r in replies] == [len(d.parts[k][0]) for k in (1, 3, 5)]
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(replies, expected))


def test_score_turns_pruned_is_the_same_in_both_loops_and_retraces_at_each_turn(tiny):
    model, _, _ = tiny
    d = dialogues(chat_tokenizer(), 16, 12, MINI_THREE, MINI)[1]
    config = DartConfig(sparsity=0.5, detector="none")
    scored = {}
    for loop in ("native", "hf"):
        with Session(model, tiny_tokenizer(), config, loop=loop) as session:
            scored[loop] = session.score_turns(d.parts, chunk=5)
            stats = session.stats()[0]
        assert stats.retrace_count == 2                                   # turns 2 and 3
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(scored["native"], scored["hf"]))
    with Session(model, tiny_tokenizer(), config) as session, pytest.raises(ValueError, match="alternates"):
        session.score_turns([d.parts[1], d.parts[0]], chunk=5)


def test_conversation_task_compares_per_turn_retrace_with_the_first_turns_mask(tiny, tmp_path):
    model, _, _ = tiny
    settings = EvalSettings(model="tiny", methods=["dart", "static"], sparsities=[0.5], tasks=["conversation"],
                            out=str(tmp_path / "conv"), data_dir=str(MINI), drift_profile="quick",
                            drift_sources=MINI_THREE, extra={"detector": "none"})
    results, out = run_evaluation(settings, model, chat_tokenizer(), command="test", echo=False)
    by = {r.method: r for r in results}
    assert set(by) == {"dense", "dart", "static"} and by["dense"].items == 6
    assert by["dart"].metrics["retraces_per_dialogue"] == 2 and by["static"].metrics["retraces_per_dialogue"] == 0
    # the first turn's mask is the same for both, so turn 1 scores alike; later turns differ
    assert by["dart"].metrics["ppl_turn_1"] == pytest.approx(by["static"].metrics["ppl_turn_1"], rel=1e-6)
    assert by["dart"].metrics["ppl_turn_2"] != pytest.approx(by["static"].metrics["ppl_turn_2"], rel=1e-6)
    assert by["dart"].metrics["executed_sparsity"] == pytest.approx(by["static"].metrics["executed_sparsity"])
    saved = json.loads((out / "results.json").read_text())
    assert {c["part"] for c in saved["comparisons"]} == {"turns 2-3", "turn 1"}


def test_summaries_end_at_each_items_own_stop_strings(tiny, tmp_path):
    """A summary file's per-item `stop` list is what cuts that item's output (it had always been '###')."""
    model, tokenizer, _ = tiny
    article = {"article": "###\nArticle: The rain fell on the town all day.\n\nSummarize the above article in 1 "
                          "sentences.", "summary_gt": "It rained.", "max_tokens": 24}

    def outputs(stops: list[list[str] | None]) -> list[str]:
        path = tmp_path / f"summaries_{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("".join(json.dumps({**article, **({"stop": stop} if stop else {})}) + "\n" for stop in stops))
        settings = EvalSettings(model="tiny", methods=["static"], sparsities=[0.5], tasks=["xsum"],
                                summary_files={"xsum": str(path)}, out=str(tmp_path / path.stem))
        _, out = run_evaluation(settings, model, tokenizer, command="test", echo=False)
        details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
        return [d["output"] for d in details if d["method"] == "dense"]

    [free] = outputs([["###"]])
    assert len(free) > 4
    cut = free[len(free) // 2]                    # a character the uncut output holds past its start
    stopped, default, one = outputs([[cut], None, cut + "\u00a7"])
    assert stopped == free[:free.index(cut)] and default == free
    assert one == free                            # one string is one stop string, not its characters
    path = tmp_path / "stops.jsonl"
    path.write_text("".join(json.dumps({**article, **stop}) + "\n" for stop in ({"stop": []}, {})))
    assert [item["stop"] for item in load_summaries("xsum", path=path)] == [[], ["###"]]   # empty: no stop string


@pytest.mark.parametrize("task, message", [
    ("drift", r"drift sequences \(--prefix \+ 2 x --drift-segment\) take 80 positions; the model's context is 48"),
    ("conversation", r"conversations take \d+ positions; the model's context is 48"),
])
def test_sequence_tasks_refuse_what_exceeds_the_context(tmp_path, task, message):
    model = tiny_model("llama")
    model.config = copy.deepcopy(model.config)       # tiny models share their family's config object
    model.config.max_position_embeddings = 48
    settings = EvalSettings(model="tiny", methods=["dart"], sparsities=[0.5], tasks=[task], out=str(tmp_path),
                            data_dir=str(MINI), drift_profile="quick", prefix=16,
                            drift_segment=32, drift_sources=MINI_THREE, limit=1)
    with pytest.raises(ValueError, match=message):
        run_evaluation(settings, model, chat_tokenizer(), command="test", echo=False)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("name, folder, labels", [("piqa", "piqa", "valid-labels.lst"),
                                                   ("siqa", "siqa", "dev-labels.lst"),
                                                   ("winogrande", "winogrande", "dev-labels.lst")])
def test_a_labels_file_of_another_length_than_its_items_is_refused(tmp_path, name, folder, labels):
    """Items and labels are paired by line: a file one line short would shift (or drop) labels silently."""
    import shutil
    shutil.copytree(MINI / folder, tmp_path / folder)
    assert len(load_mc(name, None, tmp_path)) >= 2
    path = tmp_path / folder / labels
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=f"holds \\d+ items but {labels} \\d+ labels"):
        load_mc(name, None, tmp_path)


def test_mc_sets_follow_the_data_readme(data_root):
    """The real sets, mapped as docs/data.md says."""
    copa = load_mc("copa", 1, data_root)[0]
    assert copa.pairs[0] == ("The man turned on the faucet therefore", " the toilet filled with water.")
    assert copa.label == 1
    wino = load_mc("winogrande", 1, data_root)[0]
    assert not wino.shared_context and wino.pairs[0][1] == wino.pairs[1][1] == " always got the easier cases."
    assert wino.pairs[1][0].endswith("so Maria") and wino.label == 1
    boolq = load_mc("boolq", 1, data_root)[0]
    assert boolq.choices == ["no", "yes"] and boolq.pairs[0][0].endswith("?\nAnswer:")
    for name in ("piqa", "arc_easy", "arc_challenge", "openbookqa", "siqa", "commonsenseqa"):
        item = load_mc(name, 2, data_root)[1]
        assert 0 <= item.label < len(item.choices) and item.shared_context
    assert len(load_mc("openbookqa", 3, data_root)[2].choices) == 4
    assert len(load_mc("commonsenseqa", 1, data_root)[0].choices) == 5
    assert len(load_summaries("cnn_dailymail", 30, data_root)) == 30


def test_local_layouts_map_to_items():
    """Every set of the synthetic folder, with hand-checked items (the same mapping as the real sets)."""
    assert load_mc("piqa", None, MINI)[1].pairs[1] == ("Question: Loosen a tight jar lid.\nAnswer:",
                                                       " Run the lid under hot water.")
    assert [i.label for i in load_mc("piqa", None, MINI)] == [0, 1]
    easy = load_mc("arc_easy", None, MINI)
    assert easy[0].label == 1 and easy[1].label == 1 and easy[1].choices[1] == "carbon dioxide"
    assert [i.label for i in load_mc("boolq", None, MINI)] == [1, 0]
    copa = load_mc("copa", None, MINI)
    assert copa[0].pairs[0] == ("The ice on the pond melted because", " the sun came out.")
    assert copa[1].pairs[1] == ("I left the bread in the oven too long therefore", " it burned.")
    book = load_mc("openbookqa", None, MINI)
    assert book[0].choices[1] == "it goes round once a day" and book[0].label == 1 and book[1].label == 0
    wino = load_mc("winogrande", None, MINI)[0]
    assert wino.pairs == [("The jar would not fit in the bag because the jar", " was too small."),
                          ("The jar would not fit in the bag because the bag", " was too small.")]
    assert wino.label == 1
    siqa = load_mc("siqa", None, MINI)
    assert siqa[1].pairs[1][0] == "Q: Tobias told the skippers to stay in port. Why did Tobias do this?\nA:"
    assert [i.label for i in siqa] == [0, 1]
    assert load_mc("commonsenseqa", None, MINI)[0].label == 0
    [cnn] = load_summaries("cnn_dailymail", None, MINI)
    assert cnn["max_tokens"] == 24 and cnn["stop"] == ["###"] and cnn["article"].endswith("in 3 sentences.")
    assert load_text("wikitext2", MINI).text.startswith(" = Wenlow = ")


def test_hub_rows_map_like_local_rows():
    """Rows with the Hub's field names (as `datasets` returns them) give the same items as the local files."""
    hub_arc = {"question": "Which of these is a source of light?", "answerKey": "B",
               "choices": {"text": ["a mirror", "the Sun", "the Moon's shadow", "a rock"], "label": list("ABCD")}}
    assert mc_items("arc_easy", [hub_arc])[0] == load_mc("arc_easy", 1, MINI)[0]
    hub_wino = {"sentence": "The jar would not fit in the bag because the _ was too small.", "option1": "jar",
                "option2": "bag", "answer": "2"}
    assert mc_items("winogrande", [hub_wino])[0] == load_mc("winogrande", 1, MINI)[0]
    hub_boolq = {"question": "does bread need salt to rise", "passage": "Yeast makes bread rise; salt adds flavour "
                 "and slows the yeast.", "idx": 1, "label": 0}
    assert mc_items("boolq", [hub_boolq])[0].pairs == load_mc("boolq", None, MINI)[1].pairs
    hub_siqa = {"context": "Mara stayed up all night watching the harbour.", "question": "How would Mara feel in "
                "the morning?", "answerA": "tired", "answerB": "rested", "answerC": "hungry for fish", "label": "1"}
    assert mc_items("siqa", [hub_siqa])[0] == load_mc("siqa", 1, MINI)[0]


def test_missing_data_says_both_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("DARTPRUNE_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as err:
        load_mc("piqa", 2)
    message = str(err.value)
    assert "--data-dir" in message and "DARTPRUNE_DATA" in message and "baber/piqa" in message
    assert "docs/data.md" in message and "switched off" in message
    with pytest.raises(DataNotFoundError, match="not a folder"):
        load_mc("piqa", 2, tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="only read from a local folder"):
        load_text("gutenberg:austen-emma")
    assert "import" in load_text("python:argparse").text


@pytest.mark.parametrize("method", ["dart", "griffin"])
def test_mc_mask_is_traced_from_the_context_only(tiny, method):
    """The kept neurons after the context prefill are the same whichever choice is then scored."""
    model, tokenizer, _ = tiny
    item = MCItem("test", 0, ["a cat", "the big dog ran far away, and then came back home", "x"], 0,
                  [("Question: what did she see in the garden?\nAnswer:", c) for c in
                   (" a cat", " the big dog ran far away, and then came back home", " x")])
    kept: dict[int, list[torch.Tensor]] = {}
    with Session(model, tokenizer, DartConfig(method=method, sparsity=0.5, window=3)) as session:
        lls = score_item(session, tokenizer, item, 3, on_traced=lambda c: kept.__setitem__(
            c, [session.engine.kept(0, layer) for layer in range(len(session.engine.layers))]))
    assert len(lls) == 3 and sorted(kept) == [0, 1, 2]
    for layer in range(len(kept[0])):
        assert torch.equal(kept[0][layer], kept[1][layer]) and torch.equal(kept[0][layer], kept[2][layer])
    assert any(k.numel() < 96 for k in kept[0])  # something was pruned


def test_mc_dense_scores_match_plain_forward(tiny):
    model, tokenizer, _ = tiny
    item = load_mc("copa", 1, MINI)[0]
    with Session(model, tokenizer, DartConfig(method="dense")) as session:
        lls = score_item(session, tokenizer, item, 5)
    for ll, (context, continuation) in zip(lls, item.pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        assert ll == pytest.approx(float(dense_reference_logprobs(model, ctx + cont, len(ctx) - 1).sum()), abs=1e-4)


# ----------------------------------------------------------------------------------------------- the command
def test_eval_command_writes_results_table_and_plots(tiny, tmp_path, capsys):
    from dartprune.cli.eval import main
    _, _, folder = tiny
    out = tmp_path / "eval"
    assert main(["--model", str(folder), "--methods", "dart,static", "--sparsity", "0.5,0.7", "--data-dir", str(MINI),
                 "--tasks", "ppl,drift,mc,xsum,cnn_dailymail,topics", "--out", str(out), "--limit", "2",
                 "--drift-profile", "quick", "--drift-sources", "story=gutenberg:harbour;code=python:argparse",
                 "--mc-sets", "copa,winogrande", "--ppl-window", "64", "--prefix", "16", "--drift-segment", "32",
                 "--topic-tokens", "12", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "## Summary" in printed and "dart@0.7" in printed
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert data["meta"]["model"] == str(folder) and data["meta"]["versions"]["torch"] == torch.__version__
    for r in results:
        check_recorded(r)
        assert r["seed"] == r["config"]["seed"] == 3 and r["dtype"] == "float32"    # the seed reaches the methods
    labels = {(r["method"], r["sparsity"]) for r in results}
    assert labels == {("dense", 0.0), ("dart", 0.5), ("dart", 0.7), ("static", 0.5), ("static", 0.7)}
    by = {(r["task"], r["subtask"], r["method"], r["sparsity"]): r for r in results}
    assert by[("mc", "copa", "dart", 0.5)]["items"] == 2 and by[("mc", "mean", "dense", 0.0)]["items"] == 4
    assert by[("xsum", "xsum_1shot", "dense", 0.0)]["metrics"]["rougeL_vs_dense"] == 1.0
    assert set(by[("xsum", "xsum_1shot", "static", 0.5)]["metrics"]) >= {"rouge1", "rouge2", "rougeL",
                                                                        "rougeL_vs_dense", "repetition"}
    assert by[("topics", "two_topic_prompts", "dart", 0.7)]["items"] == 2
    assert "retraces_mean" in by[("topics", "two_topic_prompts", "dart", 0.7)]["engine"]
    assert by[("drift", "all", "dart", 0.5)]["metrics"]["ppl_after"] > 0
    assert by[("cnn_dailymail", "cnn_dailymail_0shot", "dense", 0.0)]["items"] == 1
    assert str(MINI) not in (out / "results.json").read_text()   # no machine paths in results
    assert (out / "results.md").read_text().startswith("# dartprune eval")
    pngs = {p.name for p in out.glob("*.png")}
    assert {"plot_ppl_ppl.png", "plot_drift_ppl_after.png", "plot_mc_acc_norm.png", "plot_xsum_rougeL.png",
            "plot_topics_rougeL_vs_dense.png"} <= pngs
    details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    assert len(details) > 10
    # summaries are compared paired over articles, against static at the same sparsity and against dense
    rouge = {(c["task"], c["method"]): c for c in data["comparisons"] if c.get("measure") == "rougeL"}
    def rouge_l(method, sparsity):
        return [d["scores"]["rougeL"] for d in details if d["task"] == "xsum" and d["method"] == method
                and d["sparsity"] == sparsity]
    mine, theirs = rouge_l("dart", 0.5), rouge_l("static", 0.5)
    compared = rouge[("xsum", "dart@0.5")]
    assert compared["items"] == len(mine) == len(theirs) >= 1
    assert compared["difference_vs_static"][0] == pytest.approx(sum(mine) / len(mine) - sum(theirs) / len(theirs))
    low, high = compared["difference_vs_static"][1:]
    assert low <= compared["difference_vs_static"][0] <= high
    assert "ratio_vs_static" not in rouge[("xsum", "static@0.5")] and "ratio_vs_dense" in rouge[("xsum", "static@0.5")]
    # perplexity windows are compared paired as well
    windows = {(d["method"], d["sparsity"]): d["window_ppl"] for d in details if d["task"] == "ppl"}
    [ppl_row] = [c for c in data["comparisons"] if c["task"] == "ppl" and c["method"] == "dart@0.7"]
    logs = {key: [math.log(p) for p in value] for key, value in windows.items()}
    expected = math.exp(sum(logs[("dart", 0.7)]) / 2 - sum(logs[("static", 0.7)]) / 2)
    assert ppl_row["part"] == "windows" and ppl_row["items"] == 2
    assert ppl_row["ppl_ratio_vs_static"][0] == pytest.approx(expected)
    text = (out / "results.md").read_text()
    assert "ROUGE-L difference vs static" in text and "ppl ratio vs static" in text
    drift_header = next(line for line in text.splitlines() if line.startswith("| subtask | method | ppl_before"))
    assert drift_header.count("executed") == 1
    # the same folder again, fewer tasks: the plots of tasks this run did not have go with the earlier results
    (out / "notes.png").write_bytes(b"the user's own file")
    assert main(["--model", str(folder), "--methods", "static", "--sparsity", "0.5", "--data-dir", str(MINI),
                 "--tasks", "ppl", "--out", str(out), "--limit", "2", "--ppl-window", "64", "--prefix", "16"]) == 0
    assert {p.name for p in out.glob("*.png")} == {"plot_ppl_ppl.png", "notes.png"}


def test_eval_command_errors(tmp_path):
    from dartprune.cli.eval import main
    with pytest.raises(ValueError, match="unknown task"):
        main(["--model", "x", "--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method"):
        main(["--model", "x", "--methods", "nope", "--out", str(tmp_path)])


def test_eval_with_missing_data_leaves_no_output_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("DARTPRUNE_DATA", raising=False)
    model, tokenizer, _ = tiny
    out = tmp_path / "never"
    settings = EvalSettings(model="tiny", methods=["static"], sparsities=[0.5], tasks=["topics", "mc"],
                            out=str(out), limit=1)
    with pytest.raises(DataNotFoundError):
        run_evaluation(settings, model, tokenizer, command="test", echo=False)
    assert not out.exists()


def test_a_calibrated_method_is_not_evaluated_on_its_calibration_text(tiny, tmp_path):
    """Checked once every task's data is prepared, before any output or compute; another text runs."""
    from dartprune.calibration.collect import calibrate
    from dartprune.calibration.file import CalibrationError
    model, tokenizer, _ = tiny
    harbour = MINI / "gutenberg" / "harbour.txt"
    path = calibrate(model, tokenizer, "wanda-static", load_text(harbour), tmp_path / "cal.safetensors",
                     samples=2, seq_len=32).path

    def settings(text: Path, out: str) -> EvalSettings:
        return EvalSettings(model="tiny", methods=["wanda-static"], sparsities=[0.5], tasks=["ppl"], text=str(text),
                            out=str(tmp_path / out), limit=1, ppl_window=64, prefix=16,
                            calibration={"wanda-static": path})

    with pytest.raises(CalibrationError, match="is the calibration text"):
        run_evaluation(settings(harbour, "same"), model, tokenizer, command="test", echo=False)
    assert not (tmp_path / "same").exists()
    results, _ = run_evaluation(settings(MINI / "gutenberg" / "kitchen.txt", "other"), model, tokenizer,
                                command="test", echo=False)
    assert [r.method for r in results] == ["dense", "wanda-static"]
    from dartprune.cli.eval import main      # a bare --calibration-file reaches a variant of a calibrated method
    _, _, folder = tiny
    assert main(["--model", str(folder), "--methods", "wanda-static[allocation=uniform]", "--calibration-file",
                 str(path), "--tasks", "ppl", "--text", str(MINI / "gutenberg" / "kitchen.txt"), "--limit", "1",
                 "--ppl-window", "64", "--prefix", "16", "--out", str(tmp_path / "cli")]) == 0


def test_the_calibration_text_rule_looks_at_the_sequences_scored(tiny, tmp_path):
    """A drift run limited to sequences that do not read the calibration text runs; one that reads it is refused."""
    from dartprune.calibration.collect import calibrate
    from dartprune.calibration.file import CalibrationError
    model, tokenizer, _ = tiny
    path = calibrate(model, tokenizer, "wanda-static", load_text("gutenberg:orbits", str(MINI)),
                     tmp_path / "cal.safetensors", samples=2, seq_len=32).path

    def run(limit: int, out: str):
        settings = EvalSettings(model="tiny", methods=["wanda-static"], sparsities=[0.5], tasks=["drift"],
                                out=str(tmp_path / out), data_dir=str(MINI), drift_profile="quick", prefix=16,
                                drift_sources=MINI_GENRES, limit=limit, calibration={"wanda-static": path})
        return run_evaluation(settings, model, tokenizer, command="test", echo=False)

    results, _ = run(1, "first")                 # story > recipe and a story control: no orbits
    assert {r.method for r in results} == {"dense", "wanda-static"}
    with pytest.raises(CalibrationError, match="gutenberg:orbits is the calibration text"):
        run(12, "all")
    assert not (tmp_path / "all").exists()


def test_a_calibration_file_that_does_not_fit_fails_before_any_output(tiny, tmp_path, capsys):
    """Its method and sparsity before the model loads (the model named does not exist), its model after."""
    from dartprune.calibration.collect import calibrate
    model, tokenizer, folder = tiny
    text = load_text(MINI / "gutenberg" / "harbour.txt")
    wanda = calibrate(model, tokenizer, "wanda-static", text, tmp_path / "w.safetensors", samples=2, seq_len=32).path
    threshold = calibrate(model, tokenizer, "threshold", text, tmp_path / "t.safetensors", samples=2, seq_len=32,
                          sparsities=(0.5,)).path
    other = tmp_path / "other_model"
    tiny_model("llama", seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    named = tmp_path / "run=3.safetensors"        # a bare path holding '=' is a path
    named.write_bytes(Path(wanda).read_bytes())
    for name, method, file, sparsity, message in (
            ("no-such-model", "threshold", str(named), "0.5", "was made for method 'wanda-static', not 'threshold'"),
            ("no-such-model", "threshold", threshold, "0.6", "has no thresholds for sparsity 0.6"),
            (str(other), "wanda-static", wanda, "0.5", "was made for another model")):
        out = tmp_path / "out"
        assert cli_main(["eval", "--model", name, "--methods", method, "--calibration-file", file, "--sparsity",
                         sparsity, "--tasks", "ppl", "--text", str(MINI / "gutenberg" / "kitchen.txt"),
                         "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_eval_settings_wrong_for_the_run_fail_before_the_model_loads(tmp_path, capsys):
    """The model named does not exist: each run must stop on its own error, before loading it."""
    (tmp_path / "a_file").write_text("x")
    for argv, message in (
            (["--tasks", "ppl", "--limit", "foo=2"], "names unknown task(s) ['foo']"),
            (["--tasks", "ppl", "--out", str(tmp_path / "a_file")], "is a file"),
            (["--tasks", "ppl", "--limit", "abc"], "--limit takes N or TASK=N"),
            (["--tasks", "ppl", "--text", "gutenberg:nope", "--data-dir", str(MINI)], "Gutenberg text 'nope'"),
            (["--tasks", "mc", "--mc-sets", "copa,nope", "--data-dir", str(MINI)], "unknown multiple-choice set"),
            (["--tasks", "drift", "--drift-sources", "story=gutenberg:nope;code=python:argparse", "--data-dir", str(MINI)],
             "the drift benchmark reads"),
            (["--tasks", "ppl", "--methods", "wanda-static", "--calibration-file", "dart=x.safetensors"],
             "'dart' is not a calibrated method among --methods"),
            (["--tasks", "ppl", "--methods", "wanda-static", "--calibration-file", "wanda=cal.safetensors"],
             "'wanda' is not a method and wanda=cal.safetensors is not a file"),
            (["--tasks", "drift", "--drift-segment", "0"], "--drift-segment must be >= 1"),
            (["--tasks", "ppl", "--seed", str(2 ** 64)], "seed must be in [0, 2^63)"),
            (["--tasks", "ppl", "--methods", "dart", "--calibration-file", "x.safetensors"],
             "none of --methods needs a calibration file"),
            # options of tasks that --tasks leaves out would be ignored (and their errors never found)
            (["--tasks", "ppl", "--mc-sets", "nosuch"], "--mc-sets is for the mc task, which --tasks does not"),
            (["--tasks", "mc", "--text", "/nonexist.txt"], "--text is for the ppl task"),
            (["--tasks", "ppl", "--summary-file", "xsum=/nonexist.jsonl"], "--tasks does not include xsum"),
            (["--tasks", "ppl", "--drift-profile", "quick"], "--drift-profile is for the drift and conversation tasks"),
            (["--tasks", "mc", "--prefix", "32"], "--prefix is for the ppl and drift tasks"),
            (["--tasks", "ppl", "--chat", "yes"], "--chat is for the topics task"),
            (["--tasks", "pll", "--text", "/nonexist.txt"], "unknown task 'pll'"),
            (["--tasks", "ppl", "--limit", "ppl=2,mc=3"], "--limit names task(s) ['mc'] that --tasks does not include"),
    ):
        argv = ["eval", "--model", "no-such-model", "--out", str(tmp_path / "out"), *argv]
        try:
            code = cli_main(argv)
        except SystemExit as exit_info:          # argparse's own refusal
            code = exit_info.code
        assert code == 2 and message in capsys.readouterr().err, argv


def test_result_files_are_strict_json(tmp_path):
    """A figure that could not be measured (NaN) is written as null: strict JSON readers refuse NaN."""
    from dartprune.evaluation.registry import Result
    from dartprune.evaluation.report import write_details, write_json
    result = Result(task="drift", subtask="all", model="tiny", dtype="float32", method="dart", sparsity=0.5,
                    metrics={"median_delay": math.nan, "ppl": 3.5}, items=1, prefix_length=16, protocol="",
                    versions={}, config={}, extra={"delays": [1.0, math.inf]})
    write_json(tmp_path / "results.json", {"seconds": math.nan}, [result])
    write_details(tmp_path / "details.jsonl", [{"delay": math.nan, "kept": (1, 2)}])

    def refuse(constant: str):
        raise ValueError(f"{constant} in a result file")

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert data["meta"]["seconds"] is None and data["results"][0]["metrics"] == {"median_delay": None, "ppl": 3.5}
    assert data["results"][0]["extra"]["delays"] == [1.0, None]
    assert json.loads((tmp_path / "details.jsonl").read_text(), parse_constant=refuse) == {"delay": None,
                                                                                         "kept": [1, 2]}


def test_per_task_limits(tiny, tmp_path):
    model, tokenizer, _ = tiny
    settings = EvalSettings(model="tiny", methods=["random"], sparsities=[0.5], tasks=["topics"], out=str(tmp_path),
                            limit={"topics": 1}, topic_tokens=4)
    results, _ = run_evaluation(settings, model, tokenizer, command="test", echo=False)
    assert [r.items for r in results] == [1, 1]
    settings.limit = {"topics": 1, "mc": 5}       # a limit for a task not run would be ignored: refused
    with pytest.raises(ValueError, match=r"--limit names task\(s\) \['mc'\] that --tasks does not include"):
        run_evaluation(settings, model, tokenizer, command="test", echo=False)


def test_a_run_that_fails_leaves_an_earlier_runs_results_whole(tiny, tmp_path, monkeypatch):
    from dartprune.evaluation.generation import Topics
    model, tokenizer, _ = tiny
    settings = EvalSettings(model="tiny", methods=["static"], sparsities=[0.5], tasks=["topics"], out=str(tmp_path),
                            limit=1, topic_tokens=4)
    run_evaluation(settings, model, tokenizer, command="test", echo=False)
    complete = (tmp_path / "results.json").read_text()
    assert not (tmp_path / "results.partial.json").exists()
    evaluate = Topics.evaluate

    def fail_for_static(self, spec, session):
        if spec.method == "static":
            raise RuntimeError("stopped")
        return evaluate(self, spec, session)

    monkeypatch.setattr(Topics, "evaluate", fail_for_static)
    with pytest.raises(RuntimeError, match="stopped"):
        run_evaluation(settings, model, tokenizer, command="test", echo=False)
    assert (tmp_path / "results.json").read_text() == complete
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert [r["method"] for r in partial["results"]] == ["dense"]


# ----------------------------------------------------------------------------------------------- lm-eval backend
@pytest.fixture(scope="module")
def lm_eval_backend():
    pytest.importorskip("lm_eval")
    from dartprune.evaluation import lm_eval_backend
    return lm_eval_backend


def test_lm_eval_backend_local_copa(tiny, tmp_path, monkeypatch, lm_eval_backend):
    """`dartprune lm-eval --model dartprune` on a local COPA YAML: per-request scores equal the mc task's
    context-only scores."""
    _, tokenizer, folder = tiny
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml = (REPO / "docs" / "lm_eval_tasks" / "copa_local.yaml").read_text()
    yaml = yaml.replace("data/copa/val.jsonl", str(MINI / "copa" / "val.jsonl"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "copa_local.yaml").write_text(yaml)
    monkeypatch.setattr(sys, "argv", ["dartprune"])
    assert cli_main(["lm-eval", "--model", "dartprune", "--model_args",
                     f"pretrained={folder},method=dart,sparsity=0.5,window=4", "--include_path",
                     str(tmp_path / "tasks"), "--tasks", "dartprune_copa_local", "--limit", "2",
                     "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"]["dartprune_copa_local"]
    assert 0.0 <= acc["acc,none"] <= 1.0 and "acc_norm,none" in acc
    [samples_file] = (tmp_path / "out").rglob("samples_dartprune_copa_local_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2
    model = tiny_model("llama")  # a fresh copy: the backend loaded its own from the folder
    with Session(model, tokenizer, DartConfig(method="dart", sparsity=0.5, window=4), "hf") as session:
        for sample, item in zip(sorted(samples, key=lambda s: s["doc_id"]), load_mc("copa", 2, MINI)):
            ours = score_item(session, tokenizer, item, 4)
            theirs = [float(r[0][0]) for r in sample["resps"]]
            assert theirs == pytest.approx(ours, abs=1e-4)


def test_lm_eval_backend_model_args(tiny, lm_eval_backend):
    from dartprune.engine.config import ConfigError
    _, _, folder = tiny
    with pytest.raises(ConfigError, match="unknown DartConfig key"):
        lm_eval_backend.DartLM(pretrained=str(folder), method="dart", sparsity=0.5, windw=3)
    lm = lm_eval_backend.DartLM(pretrained=str(folder), method="static", sparsity=0.7, monitored_layers="-1;-2",
                                batch_size=1)
    assert lm.dart_config.monitored_layers == (-1, -2) and lm.handle.config.sparsity == 0.7
    from lm_eval.api.instance import Instance
    request = Instance("loglikelihood", doc={}, arguments=("Question: why?\nAnswer:", " because"), idx=0)
    first, second = lm.loglikelihood([request, request], disable_tqdm=True)
    assert first == second  # every request starts a new sequence: no state leaks between requests
    assert lm.stats_summary()["sequences"] == 2
    lm.handle.detach()


def test_compare_variants_pairs_two_methods_by_sequence_and_occurrence(tmp_path):
    """benchmarks/compare_variants.py: the ratio of geometric means over the same sequences; a name that stands
    twice (two controls from one text) pairs the n-th with the n-th."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    rows = []
    nll = {"a": ([2.0, 3.0, 4.0], [1.0, 5.0]), "b": ([2.5, 3.0, 3.0], [1.5, 4.0])}
    for method, (after, controls) in nll.items():
        for i, value in enumerate(after):
            rows.append({"method": method, "sparsity": 0.5, "name": f"s{i}", "kind": "switch", "nll_after": value,
                         "nll_before": 1.0, "nll_all": 1.0})
        for value in controls:
            rows.append({"method": method, "sparsity": 0.5, "name": "same text", "kind": "control",
                         "nll_after": 0.0, "nll_before": 0.0, "nll_all": value})
    details = tmp_path / "details.jsonl"
    a_rows = [r for r in rows if r["method"] == "a"]
    b_rows = [r for r in rows if r["method"] == "b"]
    details.write_text("\n".join(json.dumps(r) for r in a_rows[::-1] + b_rows))   # one method's order reversed
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_variants.py"
    out = tmp_path / "out.md"
    subprocess.run([sys.executable, str(script), "--method", "a", "--against", "b", "--details", str(details),
                    "--out", str(out)], check=True, capture_output=True)
    table = {line.split("|")[2].strip(): line.split("|")[3:5] for line in out.read_text().splitlines()
             if line.startswith("| 0.5")}
    after, controls = table["after switch"], table["controls"]
    from dartprune.evaluation.intervals import bootstrap, ratio_of_geomeans
    expected = bootstrap([[2.0, 3.0, 4.0], [2.5, 3.0, 3.0]], ratio_of_geomeans)   # paired by name
    assert int(after[0]) == 3 and after[1].strip() == f"{expected[0]:.3f} [{expected[1]:.3f}, {expected[2]:.3f}]"
    # a's rows reversed: its "same text" in order of occurrence is (5.0, 1.0), b's (1.5, 4.0)
    expected = bootstrap([[5.0, 1.0], [1.5, 4.0]], ratio_of_geomeans)
    assert int(controls[0]) == 2 and controls[1].strip() == f"{expected[0]:.3f} [{expected[1]:.3f}, {expected[2]:.3f}]"
    other = tmp_path / "other.jsonl"           # another run of a, with other values: which one would it be?
    other.write_text("\n".join(json.dumps({**r, "nll_after": r["nll_after"] + 1}) for r in a_rows))
    again = subprocess.run([sys.executable, str(script), "--method", "a", "--against", "b", "--details", str(details),
                            str(other)], capture_output=True, text=True)
    assert again.returncode != 0 and "give each run once" in again.stderr


def test_bos_on_every_window_for_the_gemma_families():
    assert [f for f in FAMILIES if needs_bos_every_window(tiny_model(f))] == ["gemma", "gemma2", "gemma3_text"]
