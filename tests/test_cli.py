import dataclasses
import io

import pytest

from dartprune.cli.main import main
from dartprune.decode.generate import Generator, SamplingParams


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_a_continuation_and_summarises(capsys):
    code, out, err = run_cli(["generate", "The capital of France is", "--max-new-tokens", "12",
                              "--method", "dart", "--sparsity", "0.5"], capsys)
    assert code == 0
    assert len(out.strip()) > 0
    assert "tokens/s" in err and "dart at sparsity 0.50" in err and "re-trace" in err


def test_generate_dense_reads_stdin_and_prompt_file(capsys, monkeypatch, tmp_path):
    code, out_stdin, _ = run_cli(["generate", "--method", "dense", "--max-new-tokens", "8", "--no-stream"],
                                 capsys, stdin="Once upon a time\n", monkeypatch=monkeypatch)   # as `echo` pipes it
    assert code == 0
    _, out_argument, _ = run_cli(["generate", "Once upon a time", "--method", "dense", "--max-new-tokens", "8",
                                  "--no-stream"], capsys)
    assert out_argument == out_stdin
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    code, out_file, _ = run_cli(["generate", "--prompt-file", str(prompt), "--method", "dense",
                                 "--max-new-tokens", "8", "--no-stream"], capsys)
    assert code == 0 and out_file == out_stdin and out_file.strip()
    code, out_option, _ = run_cli(["generate", "-p", "Once upon a time", "--method", "dense", "--max-new-tokens", "8",
                                   "--no-stream"], capsys)
    assert code == 0 and out_option == out_stdin


def test_generate_chat_and_trace_plot(capsys, tmp_path):
    plot = tmp_path / "trace.png"
    code, out, err = run_cli(["generate", "Name three colours.", "--chat", "--max-new-tokens", "30",
                              "--trace-plot", str(plot)], capsys)
    assert code == 0 and plot.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["generate", "   "], "prompt is empty"),
    (["generate", "hi", "--sparsity", "1.0"], "sparsity"),
    (["generate", "hi", "--set", "windw=3"], "windw"),
    (["generate", "hi", "--set", "window"], "KEY=VALUE"),
    (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "hi", "--method", "dense", "--compare-dense"], "dense prunes nothing"),
    (["generate", "hi", "--compare-dense", "--max-new-tokens", "1"], "it needs --max-new-tokens >= 2"),
    (["generate", "hi", "--set", "method=dense"], "set method with --method, not --set"),
    (["generate", "hi", "--sparsity", "0.7", "--set", "sparsity=0.3"], "set sparsity with --sparsity, not --set"),
    (["generate", "--prompt-file", "tests"], "Is a directory"),
    (["generate", "hi", "--seed", str(2 ** 70)], "seed must be in"),
    (["generate", "hi", "--set", "ring_size=100000000000"], "ring_size must be <= 4096"),
    (["generate", "hi", "--method", "dart", "--calibration-file", "x.safetensors"], "takes none"),
    (["generate", "hi", "--trace-plot", "trace.xyz"], "cannot write a plot to trace.xyz"),
    (["generate", "hi", "--prompt-file", "README.md"], "not both"),
    (["generate", "hi", "--prompt", "hello"], "give the prompt once"),
    (["generate", "--prompt", "hi", "--prompt-file", "README.md"], "give the prompt once"),
    (["generate", "hi", "--method", "static", "--trace-plot", "x.png"], "does not run (dart does)"),
    (["generate", "hi", "--sparsity", "0", "--compare-dense"], "dart at sparsity 0 prunes nothing"),
    (["generate", "caf\udce9"], "the prompt is not valid Unicode"),      # a Latin-1 byte on a UTF-8 argv
    (["generate", "hi", "--method", "dense", "--sparsity", "0.7"], "--method dense prunes nothing"),
    (["generate", "hi", "--method", "dense", "--set", "window=8"], "--sparsity and --set would change nothing"),
    (["generate", "hi", "--set", "calibration_file=x.safetensors"], "takes none"),
])
def test_generate_rejects_bad_input_before_loading(capsys, argv, message):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err


def test_an_abbreviated_option_is_an_error_not_another_option(capsys):
    """`--max-new` is not taken for `--max-new-tokens` (nor `--prompt` for `--prompt-file` before `-p/--prompt`
    existed): argparse would otherwise complete an abbreviation silently."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "hi", "--max-new", "4"])
    assert exit_.value.code == 2 and "unrecognized arguments: --max-new" in capsys.readouterr().err


def test_generate_rejects_prompt_longer_than_context(capsys, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 9000)
    code, _, err = run_cli(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "4"], capsys)
    assert code == 2 and "the model's context is" in err


@pytest.mark.parametrize("loop, how", [
    ("native", r"\(greedy, \d+ tokens each, a dense loop decoding in turn with the pruned one as in "
               r"`dartprune bench`\)"),
    ("hf", r"\(\d+ dense tokens after the reply, same loop\)"),
])
def test_generate_compare_dense_prints_the_speedup(capsys, loop, how):
    import re
    code, _, err = run_cli(["generate", "The capital of France is", "--max-new-tokens", "6", "--sparsity", "0.5",
                            "--compare-dense", "--no-stream", "--loop", loop], capsys)
    assert code == 0
    assert re.search(r"\| speedup over dense \d+\.\d\dx per output token " + how + r"\]", err), err
    code, _, err = run_cli(["generate", "The capital of France is", "--max-new-tokens", "6", "--stop", "Paris",
                            "--compare-dense", "--no-stream", "--loop", loop], capsys)   # the first token stops it
    assert code == 0 and "[1 token in" in err
    assert err.rstrip().endswith("| speedup over dense not measured: the reply has one token, no decode step]")


def test_generate_sampling_flags_reach_the_sampler(capsys, smollm2):
    """--temperature/--top-k/--top-p/--seed give what the Generator gives with the same SamplingParams."""
    model, tokenizer = smollm2
    argv = ["generate", "Once upon a time", "--method", "dense", "--max-new-tokens", "12", "--no-stream",
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    _, out, _ = run_cli(argv, capsys)
    with Generator(model, tokenizer, None) as generator:
        expected = generator.generate(tokenizer("Once upon a time", return_tensors="pt").input_ids[0],
                                      SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=3))
    assert out == expected.text + "\n"
    _, other_seed, _ = run_cli(argv[:-1] + ["4"], capsys)
    assert other_seed != out


def test_generate_stops_before_a_stop_string(capsys):
    greedy = ["generate", "The capital of France is", "--method", "dense", "--max-new-tokens", "16", "--no-stream"]
    _, full, _ = run_cli(greedy, capsys)
    words = full.split()
    assert len(words) >= 4
    stop = words[3]
    _, cut, err = run_cli(greedy + ["--stop", stop], capsys)
    assert cut == full[:full.index(stop)] + "\n"
    assert "tokens in" in err


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", "--method", "magic"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_eval_methods_keep_commas_inside_a_variant():
    from dartprune.cli.eval import split_methods
    assert split_methods("static, dart,dart[monitored_layers=(0, -1);window=5]") == [
        "static", "dart", "dart[monitored_layers=(0, -1);window=5]"]
    for bad in ("dart[window=5", ",", "dart]["):
        with pytest.raises(Exception, match="balanced brackets"):
            split_methods(bad)


def test_models_lists_aliases(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out and "gpt_neox" in out


def test_models_prints_plain_complete_lines_when_piped(capsys):
    code, out, _ = run_cli(["models"], capsys)   # capsys is not a terminal, as a pipe is not
    lines = out.splitlines()
    assert code == 0 and lines[0].split("\t")[0] == "alias"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:-1]}
    assert set(rows) == {"smollm2-135m", "gemma3-270m"} and all(len(r) == 6 for r in rows.values())
    assert rows["smollm2-135m"][4] == "Apache-2.0" and lines[-1].startswith("Supported model types: ")


def test_summary_labels_and_plurals():
    from dartprune.engine.stats import RetraceRecord, SequenceStats
    dense = SequenceStats(method="dense", sparsity=0.0, tokens=10, prompt_tokens=5, keep_counts=[4],
                          intermediate_sizes=[4])
    assert dense.summary() == "dense (no pruning)"
    one = SequenceStats(method="dart", sparsity=0.5, tokens=10, prompt_tokens=5, keep_counts=[2],
                        intermediate_sizes=[4], retraces=[RetraceRecord(7, 0.01, [1])], executed_sparsity=0.25,
                        work_sparsity=0.25, overhead_flops={"retrace": 17.355}, dense_flops=100.0)
    assert "| 1 re-trace |" in one.summary() and "overhead 17% of dense FLOPs" in one.summary()
    assert "dart at sparsity 0.50" in one.summary() and "more FFN work" not in one.summary()
    assert "| executed 25.0% |" in one.summary()
    assert dataclasses.replace(one, work_sparsity=None).work_sparsity == 0.25      # stats made without it
    one.work_sparsity = 0.2
    assert "| executed 25.0%, 20.0% counting re-trace scoring |" in one.summary()
    one.executed_sparsity = one.work_sparsity = -0.5
    assert "| executed -50.0% (more FFN work than dense) |" in one.summary()
